"""A worker process's side of its link to the supervisor: a socket inherited at start-up.

The supervisor (:mod:`lb.workers`) hands each worker one end of a Unix socket pair. Lines on it:

- worker to supervisor: ``admin PORT`` once the private admin listener is up, then
  ``serving`` once the client listener is bound;
- supervisor to worker: ``serve`` when the worker may bind the client listener (after the
  supervisor has replayed the admin API's runtime changes, drains and weights, into it).

End of file from the supervisor means it is gone (even if it was SIGKILLed, since the kernel
closes its end): the worker then drains and exits, so no orphan keeps the port. Unlike
``PR_SET_PDEATHSIG`` this has no start-up race (an EOF that happened before the worker looked is
still there when it does) and works on any Unix.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import select
import socket
from collections.abc import Callable

# Writes of at most this many bytes to a pipe are atomic (POSIX guarantees at least 512; Linux
# has 4096), so lines written in such pieces never interleave with another worker's.
PIPE_BUF: int = getattr(select, "PIPE_BUF", 512)


class LinkError(Exception):
    """The supervisor closed the link or sent something unexpected."""


class WorkerLink:
    """The worker's end of the supervisor link, given as an inherited file descriptor."""

    def __init__(self, index: int, fd: int) -> None:
        self.index = index
        self._fd = fd
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._watch: asyncio.Task[None] | None = None

    async def open(self) -> None:
        sock = socket.socket(fileno=self._fd)
        self._reader, self._writer = await asyncio.open_unix_connection(sock=sock)

    async def report_admin(self, port: int) -> None:
        """Tell the supervisor where this worker's private admin listener is."""
        await self._send(f"admin {port}")

    async def wait_serve(self) -> None:
        """Wait for the supervisor's go-ahead to bind the client listener; raises
        :class:`LinkError` if the supervisor goes away first."""
        assert self._reader is not None
        line = await self._reader.readline()
        if line.strip() != b"serve":
            raise LinkError(f"expected 'serve' from the supervisor, got {line!r}")

    async def report_serving(self) -> None:
        await self._send("serving")

    def watch(self, on_gone: Callable[[], None]) -> None:
        """Call ``on_gone`` once when the supervisor closes its end (it exited or died)."""
        self._watch = asyncio.get_running_loop().create_task(self._wait_eof(on_gone))

    async def _wait_eof(self, on_gone: Callable[[], None]) -> None:
        assert self._reader is not None
        while await self._reader.read(4096):
            pass  # nothing else is sent after "serve"
        on_gone()

    async def _send(self, line: str) -> None:
        assert self._writer is not None
        self._writer.write(line.encode() + b"\n")
        await self._writer.drain()

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self._writer is not None:
            self._writer.close()


class AtomicLines(io.TextIOBase):
    """A text stream on a file descriptor that writes whole lines in pieces of at most
    :data:`PIPE_BUF` bytes, each one ``write(2)``: the workers share the supervisor's standard
    output, and on a pipe a larger write could interleave with another worker's mid-line.

    A single line longer than ``PIPE_BUF`` is written alone (it may then interleave).
    """

    def __init__(self, fd: int, write: Callable[[int, memoryview], int] = os.write) -> None:
        super().__init__()
        self._fd = fd
        self._write = write  # injected by tests to see the pieces

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        data = text.encode()
        start, size = 0, len(data)
        while start < size:
            end = start + PIPE_BUF
            if end < size:
                cut = data.rfind(b"\n", start, end)
                if cut < 0:  # one line longer than PIPE_BUF: up to its end
                    cut = data.find(b"\n", end)
                    cut = size - 1 if cut < 0 else cut
                end = cut + 1
            else:
                end = size
            self._write_all(memoryview(data)[start:end])
            start = end
        return len(text)

    def _write_all(self, piece: memoryview) -> None:
        while piece:
            written = self._write(self._fd, piece)
            piece = piece[written:]


class WorkerTag(logging.Filter):
    """Adds ``worker`` (the index) to every log record, so a JSON line says who wrote it."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


def tag_log_lines(index: int, log_format: str) -> None:
    """Mark every operational log line of this process as worker ``index``'s."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(WorkerTag(index))
        if log_format == "text":
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(worker)s]: %(message)s")
            )
