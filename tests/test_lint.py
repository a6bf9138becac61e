"""The code base passes its own linters: ruff (lint and format) and mypy in strict mode."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=240
    )


@pytest.mark.timeout(300)
def test_ruff_finds_no_lint_problems() -> None:
    """``ruff check`` reports nothing."""
    result = _run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(300)
def test_the_code_is_formatted() -> None:
    """``ruff format --check`` would change nothing."""
    result = _run("ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(300)
def test_mypy_strict_finds_no_type_errors() -> None:
    """``mypy`` (strict, settings in pyproject.toml) reports nothing."""
    result = _run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr
