"""The access log: one JSON line per request on standard output, sampled, written in batches.

Lines are formatted on the request's path but written together at most every
``FLUSH_INTERVAL_S``, so logging costs one write per batch rather than one per request.
Failed requests (5xx, no response) are always logged, whatever the sample rate. Headers are
never logged, so neither are API keys or tokens.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from typing import Any, TextIO

FLUSH_INTERVAL_S = 0.05
MAX_BUFFERED_LINES = 1000


class AccessLogger:
    """Buffers access-log lines and writes them to ``stream`` in batches."""

    def __init__(
        self,
        *,
        enabled: bool = True,
        sample_rate: float = 1.0,
        stream: TextIO | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.enabled = enabled
        self.sample_rate = sample_rate
        self._stream = stream
        self._rng = rng or random.Random()
        self._lines: list[str] = []
        self._timer: asyncio.TimerHandle | None = None

    def wants(self, status: int) -> bool:
        """Whether a request answered ``status`` (0: no answer) is to be logged."""
        if not self.enabled:
            return False
        if status == 0 or status >= 500 or self.sample_rate >= 1.0:
            return True
        return self._rng.random() < self.sample_rate

    def log(self, record: dict[str, Any]) -> None:
        """Queue one line; ``record`` must be JSON-serialisable."""
        record["time"] = _iso_now()
        self._lines.append(json.dumps(record, separators=(",", ":")))
        if len(self._lines) >= MAX_BUFFERED_LINES:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(FLUSH_INTERVAL_S, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        stream = self._stream or sys.stdout
        stream.write("\n".join(self._lines) + "\n")
        stream.flush()
        self._lines.clear()


def _iso_now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
