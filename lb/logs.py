"""Operational logging: structured JSON lines (or plain text) on standard error.

Health changes, ejections, reloads, start and stop are logged once, when they happen, through
the standard ``logging`` module; this module only decides how a record is written.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

# Attributes every LogRecord has; anything else passed with ``extra=`` is written as a field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _ClientErrorsAtDebug(logging.Filter):
    """aiohttp logs each malformed request it refuses (a 400) at error level with its
    traceback: any client that reaches the admin listener could flood the log with them.
    They are the client's errors, already answered: logged at debug level, without the
    traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError) or (exc.code or 400) >= 500:
            return True
        record.levelno = logging.DEBUG
        record.levelname = "DEBUG"
        record.exc_info = None
        record.exc_text = None
        record.msg = f"{record.msg}: {exc.message or exc!r}"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def quiet_client_errors() -> None:
    """Install the filter above on aiohttp's server logger (once, however often called)."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ClientErrorsAtDebug) for f in logger.filters):
        logger.addFilter(_ClientErrorsAtDebug())


# Set when the command line chose the level: it outranks the file's log_level on reload.
_level_pinned = False


def reload_level(level: str) -> None:
    """A reloaded file's ``log_level``, unless the command line set the level."""
    if not _level_pinned:
        logging.getLogger().setLevel(level.upper())


def setup_logging(level: str, fmt: str = "json", *, pinned: bool = False) -> None:
    """Send log records at ``level`` and above to standard error, as JSON or text;
    ``pinned``: the level came from the command line, and a reload keeps it."""
    global _level_pinned
    _level_pinned = pinned
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
