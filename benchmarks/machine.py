"""A description of the machine and software a benchmark ran on, for the results file."""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from lb import native

PACKAGES = ("uvloop", "aiohttp", "httptools")


def cpu_model() -> str:
    """The first ``model name`` in ``/proc/cpuinfo``; ``platform.processor()`` otherwise."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_gib() -> float | None:
    """Total memory from ``/proc/meminfo``; ``None`` if it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _run(argv: list[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit(root: Path) -> tuple[str, bool | None]:
    """The short commit of ``root`` and whether the working tree differs from it.

    ``("unknown", None)`` outside a git repository.
    """
    commit = _run(["git", "rev-parse", "--short", "HEAD"], root)
    if commit is None:
        return "unknown", None
    status = _run(["git", "status", "--porcelain"], root)
    return commit, None if status is None else bool(status)


def wrk_version() -> str:
    """wrk's banner (``wrk --version`` prints it and exits with status 1)."""
    try:
        done = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (done.stdout or done.stderr).splitlines()
    return lines[0].split(" Copyright")[0].strip() if lines else "unknown"


def host_label() -> str:
    """A file-name-safe short host name, or ``local`` when there is no useful one."""
    name = socket.gethostname().split(".")[0].lower()
    name = re.sub(r"[^a-z0-9-]+", "-", name).strip("-")
    return "local" if name in ("", "localhost") else name


def data_plane() -> str:
    """``compiled`` or ``pure (why)``: the build a proxy process started now would import."""
    if os.environ.get("LB_NATIVE", "1") == "0":
        return "pure (LB_NATIVE=0)"
    reason = native.stale_reason(native.native_dir())
    return "compiled (mypyc)" if reason is None else f"pure ({reason})"


def describe(root: Path) -> dict[str, Any]:
    """CPU, cores, memory, kernel, Python and package versions, and the git commit."""
    commit, dirty = git_commit(root)
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": memory_gib(),
        "kernel": platform.release(),
        # The interpreter's own file, not the venv's link: builds differ by about a fifth in
        # speed (a distribution's, optimized with profiles and at link time, or a plain one).
        # Then which build of lb's data plane a proxy started from here runs (lb/native.py).
        "python": f"{platform.python_version()} ({os.path.realpath(sys.executable)});"
        f" lb data plane: {data_plane()}",
        "packages": {name: package_version(name) for name in PACKAGES},
        "wrk": wrk_version(),
        "git_commit": commit,
        "git_dirty": dirty,
    }
