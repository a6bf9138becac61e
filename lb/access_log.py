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
from json.encoder import encode_basestring_ascii
from typing import Any, Final, TextIO

FLUSH_INTERVAL_S = 0.05
MAX_BUFFERED_LINES: Final = 1000


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
        self._second = -1
        self._second_text = ""

    def wants(self, status: int) -> bool:
        """Whether a request answered ``status`` (0: no answer) is to be logged."""
        if not self.enabled:
            return False
        if status == 0 or status >= 500 or self.sample_rate >= 1.0:
            return True
        return self._rng.random() < self.sample_rate

    def log(self, record: dict[str, Any]) -> None:
        """Queue one line; ``record`` must be JSON-serialisable."""
        record["time"] = self._now()
        self._queue(json.dumps(record, separators=(",", ":")))

    def log_request(
        self,
        request_id: str,
        method: str,
        path: str,
        route: str | None,
        pool: str | None,
        backend: str | None,
        status: int,
        attempts: int,
        bytes_in: int,
        bytes_out: int,
        ttfb_s: float,
        duration_s: float,
        outcome: str,
    ) -> None:
        """Queue one request's line, formatted without ``json.dumps`` (this runs per request).

        Strings that could hold anything are escaped with the JSON encoder's own C routine.
        """
        self._queue(
            f'{{"time":"{self._now()}","request_id":{_quote(request_id)},'
            f'"method":{_quote(method)},"path":{_quote(path)},'
            f'"route":{_quote(route) if route is not None else "null"},'
            f'"pool":{_quote(pool) if pool is not None else "null"},'
            f'"backend":{_quote(backend) if backend is not None else "null"},'
            f'"status":{status},"attempts":{attempts},"bytes_in":{bytes_in},'
            f'"bytes_out":{bytes_out},'
            f'"ttfb_s":{f"{ttfb_s:.6f}" if ttfb_s >= 0.0 else "null"},'
            f'"duration_s":{duration_s:.6f},"outcome":{_quote(outcome)}}}'
        )

    def _now(self) -> str:
        # Formatting the time is the costly part of a line: the second is formatted once.
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((now - second) * 1000):03d}Z"

    def _queue(self, line: str) -> None:
        self._lines.append(line)
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


_quote = encode_basestring_ascii
