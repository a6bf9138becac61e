"""Compile the data plane with mypyc: ``python -m lb.native_build [build [--force] | status]``.

A build needs mypy (the ``native`` extra), a C compiler and the interpreter's headers. It
compiles `lb.native.COMPILED` from a copy of the sources into a staging directory, then moves
the extension modules and a manifest of what they were built from into `native_dir()` in one
rename, so a running or starting proxy never sees half a build. It does nothing when the build
there is already fresh.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from lb.native import (
    COMPILED,
    EXT_SUFFIX,
    MANIFEST,
    PACKAGE_DIR,
    native_dir,
    sources_digest,
    stale_reason,
)

# mypy's view while compiling: the project's own plugin and stub settings, without strictness
# (a compile is not a lint) and without the lint's file list (mypyc is given its own).
_MYPY_INI = """\
[mypy]
python_version = 3.11
plugins = pydantic.mypy

[mypy-httptools.*,uvloop]
ignore_missing_imports = True
"""


def build(directory: Path | None = None, *, force: bool = False) -> Path:
    """Compile `COMPILED` into ``directory`` (default: `native_dir`) unless it is fresh."""
    directory = directory or native_dir()
    if not force and stale_reason(directory) is None:
        print(f"lb: the compiled build in {directory} is up to date")
        return directory
    from mypyc.build import mypycify  # only a build needs mypy
    from setuptools import setup

    with tempfile.TemporaryDirectory(prefix="lb-native-") as tmp:
        stage = Path(tmp)
        shutil.copytree(
            PACKAGE_DIR, stage / "lb", ignore=shutil.ignore_patterns("__pycache__", "*.so", ".*")
        )
        # The copy compiled is the copy described: an edit made during the build (and undone
        # later) cannot pass for what was built.
        digest = sources_digest(stage / "lb")
        (stage / "mypy.ini").write_text(_MYPY_INI)
        here = os.getcwd()
        os.chdir(stage)  # mypyc names modules and writes its files relative to here
        try:
            extensions = mypycify(
                ["--config-file", "mypy.ini", *(f"lb/{name}.py" for name in COMPILED)],
                opt_level="3",
            )
            setup(
                name="lb-native",
                ext_modules=extensions,
                script_args=["--quiet", "build_ext", "--inplace", f"--parallel={os.cpu_count()}"],
            )
        finally:
            os.chdir(here)
        fresh = directory.with_name(directory.name + ".new")
        shutil.rmtree(fresh, ignore_errors=True)
        (fresh / "lb").mkdir(parents=True)
        for name in COMPILED:
            shutil.move(stage / "lb" / f"{name}{EXT_SUFFIX}", fresh / "lb")
        for runtime in stage.glob(f"*__mypyc{EXT_SUFFIX}"):
            shutil.move(runtime, fresh)
        manifest = {
            "ext_suffix": EXT_SUFFIX,
            "python": sys.version,
            "sources": digest,
            "modules": list(COMPILED),
        }
        (fresh / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    shutil.rmtree(directory, ignore_errors=True)
    fresh.rename(directory)
    print(f"lb: compiled {len(COMPILED)} modules into {directory}")
    return directory


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else "build"
    if command == "build":
        build(force="--force" in args)
        return 0
    if command == "status":
        reason = stale_reason(native_dir())
        if os.environ.get("LB_NATIVE", "1") == "0":
            reason = "LB_NATIVE=0"
        print("compiled" if reason is None else f"pure ({reason})")
        return 0
    print("usage: python -m lb.native_build [build [--force] | status]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
