"""The compiled build is used only when it matches the sources and the interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lb import native

REPO = Path(__file__).resolve().parent.parent


def build_used(env: dict[str, str]) -> tuple[str, str]:
    """In a fresh interpreter: which build the package chose, and where lb.proxy came from."""
    code = "import lb.native, lb.proxy; print(lb.native.build_in_use); print(lb.proxy.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    return out[0], out[1]


def write_manifest(directory: Path, **changes: object) -> None:
    manifest: dict[str, object] = {
        "ext_suffix": native.EXT_SUFFIX,
        "sources": native.sources_digest(),
        "modules": list(native.COMPILED),
    }
    manifest.update(changes)
    directory.mkdir(parents=True)
    (directory / native.MANIFEST).write_text(json.dumps(manifest))


def test_a_manifest_matching_the_sources_and_interpreter_is_fresh(tmp_path):
    write_manifest(tmp_path / "build")
    assert native.stale_reason(tmp_path / "build") is None


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"sources": "0" * 64}, "the sources changed since it was built"),
        ({"ext_suffix": ".cpython-312-x86_64-linux-gnu.so"}, "built for another interpreter"),
        ({"modules": ["proxy"]}, "built with another module list"),
    ],
)
def test_a_build_from_other_sources_or_for_another_interpreter_is_stale(tmp_path, changes, reason):
    write_manifest(tmp_path / "build", **changes)
    assert native.stale_reason(tmp_path / "build") == reason


def test_a_directory_without_a_build_is_reported_as_such(tmp_path):
    assert native.stale_reason(tmp_path) == f"no compiled build in {tmp_path}"


def test_a_stale_build_is_passed_over_and_the_sources_run(tmp_path):
    """A manifest from other sources: the package imports its Python modules."""
    write_manifest(tmp_path / sys.implementation.cache_tag, sources="0" * 64)
    build, proxy_file = build_used({"LB_NATIVE_DIR": str(tmp_path), "LB_NATIVE": "1"})
    assert build == "pure"
    assert proxy_file == str(REPO / "lb" / "proxy.py")


def test_lb_native_0_runs_the_sources_even_beside_a_fresh_build():
    build, proxy_file = build_used({"LB_NATIVE": "0"})
    assert build == "pure"
    assert proxy_file == str(REPO / "lb" / "proxy.py")


@pytest.mark.skipif(
    native.stale_reason(native.native_dir()) is not None,
    reason="no fresh compiled build here (make native builds one)",
)
def test_a_fresh_build_runs_the_compiled_modules():
    build, proxy_file = build_used({"LB_NATIVE": "1"})
    assert build == "compiled"
    assert proxy_file == str(native.native_dir() / "lb" / f"proxy{native.EXT_SUFFIX}")


def test_hidden_files_are_not_sources_and_an_unreadable_source_means_stale(tmp_path):
    package = tmp_path / "lb"
    (package / "sub").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    (package / "sub" / "b.py").write_text("y = 2\n")
    digest = native.sources_digest(package)
    # An editor's lock file: a hidden name, here a link to nothing.
    (package / ".#a.py").symlink_to(tmp_path / "nowhere.py")
    assert native.sources_digest(package) == digest
    (package / "c.py").symlink_to(tmp_path / "nowhere.py")
    with pytest.raises(OSError):
        native.sources_digest(package)


def test_a_source_that_cannot_be_read_makes_the_build_stale_not_an_import_error(
    tmp_path, monkeypatch
):
    write_manifest(tmp_path / "build")

    def unreadable(package_dir: Path = native.PACKAGE_DIR) -> str:
        raise PermissionError(13, "Permission denied", "lb/proxy.py")

    monkeypatch.setattr(native, "sources_digest", unreadable)
    reason = native.stale_reason(tmp_path / "build")
    assert reason is not None and reason.startswith("the sources cannot all be read")
