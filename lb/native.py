"""The compiled build: the modules a request runs through, compiled to C by mypyc.

The same sources run two ways. Pure Python runs everywhere. The compiled build turns the
modules in `COMPILED` into extension modules, kept apart from the sources in a directory of
their own (`.native/` beside the package, or `$LB_NATIVE_DIR`), and spends about a third less
CPU per request. `activate`, called when the package is imported, puts that directory ahead of
the sources in the package's search path only when its manifest says it was built from exactly
these sources for this interpreter; a build gone stale by an edit is passed over, never run.
`LB_NATIVE=0` keeps the pure-Python modules even when a fresh build exists.

`python -m lb.native_build` compiles (see there); `python -m lb.native_build status` tells which
build an import would use.

Only this module's standard-library imports run before the package's own modules load: it must
not import anything from `lb`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent

# The data plane: what runs for every request and every relayed chunk. Modules that hand
# functions or classes to frameworks which set attributes on them (aiohttp's middlewares, the
# admin app), and the pydantic config models, stay pure Python; so do the strategies, which
# users subclass, and the error classes, whose subclasses override class attributes.
COMPILED = (
    "access_log",
    "admission",
    "backend",
    "body",
    "client_auth",
    "downstream",
    "exchange",
    "forwarding",
    "histogram",
    "http1",
    "inference",
    "load",
    "metrics",
    "mirror",
    "openai_body",
    "outlier",
    "pool",
    "proxy",
    "request",
    "retry",
    "rotation",
    "router",
    "stats",
    "timers",
    "tls",
    "tunnel",
    "upstream",
)

MANIFEST = "manifest.json"
EXT_SUFFIX = str(sysconfig.get_config_var("EXT_SUFFIX"))

# Which build the package runs on: "compiled" or "pure", set by activate().
build_in_use = "pure"


def native_dir() -> Path:
    """Where the compiled build of this interpreter lives."""
    root = os.environ.get("LB_NATIVE_DIR") or str(PACKAGE_DIR.parent / ".native")
    return Path(root) / sys.implementation.cache_tag


def sources_digest(package_dir: Path = PACKAGE_DIR) -> str:
    """A digest of every Python source of the package, names and contents (hidden files, such
    as an editor's lock files, are not sources). Raises OSError when one cannot be read."""
    digest = hashlib.sha256()
    for path in sorted(package_dir.rglob("*.py")):
        relative = path.relative_to(package_dir)
        if any(part.startswith(".") for part in relative.parts):
            continue
        digest.update(relative.as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def read_manifest(directory: Path) -> dict[str, object] | None:
    try:
        found = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def stale_reason(directory: Path) -> str | None:
    """Why the build in ``directory`` cannot run here, or None when it can."""
    manifest = read_manifest(directory)
    if manifest is None:
        return f"no compiled build in {directory}"
    if manifest.get("ext_suffix") != EXT_SUFFIX:
        return "built for another interpreter"
    try:
        sources = sources_digest()
    except OSError as exc:
        return f"the sources cannot all be read ({exc})"
    if manifest.get("sources") != sources:
        return "the sources changed since it was built"
    if manifest.get("modules") != list(COMPILED):
        return "built with another module list"
    return None


def activate(package_path: list[str]) -> str:
    """Put a fresh compiled build ahead of the sources in ``package_path`` (the package's
    ``__path__``); return which build the package runs on."""
    global build_in_use
    if os.environ.get("LB_NATIVE", "1") == "0":
        return build_in_use
    directory = native_dir()
    if stale_reason(directory) is not None:
        return build_in_use
    # The modules' shared runtime library is a top-level module of the build directory.
    sys.path.append(str(directory))
    package_path.insert(0, str(directory / "lb"))
    build_in_use = "compiled"
    return build_in_use
