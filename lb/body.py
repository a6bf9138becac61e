"""A request body on its way from the client to a backend: streamed, bounded, replayable.

Chunks are written to the current upstream connection as they arrive. Until one is attached
they are held, and the client is paused once ``hold_bytes`` are waiting. While the body is no
larger than ``replay_bytes`` every chunk is also kept, so a failed attempt can be replayed on a
fresh connection; a larger body is streamed through without a copy and cannot be retried.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

from lb.errors import BodyTooLarge
from lb.http1 import Headers, chunk, last_chunk


class BodyWriter(Protocol):
    def write(self, data: bytes) -> None: ...


class RequestBody:
    """The body of one client request; ``chunked`` bodies are re-framed chunk by chunk."""

    __slots__ = (
        "_chunks",
        "_collect_limit",
        "_completion",
        "_holding",
        "_on_hold",
        "_sent_any",
        "_waiter",
        "chunked",
        "complete",
        "fed_at_s",
        "hold_bytes",
        "max_bytes",
        "replay_bytes",
        "replayable",
        "sink",
        "size",
        "trailers",
    )

    def __init__(
        self,
        *,
        chunked: bool,
        max_bytes: int,
        replay_bytes: int = 1 << 20,
        hold_bytes: int = 256 << 10,
        on_hold: Callable[[bool], None] | None = None,
        complete: bool = False,
    ) -> None:
        self.chunked = chunked
        self.max_bytes = max_bytes
        self.replay_bytes = replay_bytes
        self.hold_bytes = hold_bytes
        self.complete = complete
        self.replayable = True
        self.size = 0
        self.fed_at_s = time.monotonic()  # when the last body byte (or the head) came
        self.sink: BodyWriter | None = None
        self.trailers: Headers = []
        self._chunks: list[bytes] = []
        self._on_hold = on_hold
        self._sent_any = False
        self._holding = False
        self._collect_limit = 0  # while collecting: hold up to this instead of hold_bytes
        self._waiter: asyncio.Future[None] | None = None
        self._completion: asyncio.Future[None] | None = None  # for observers (a mirror)

    @property
    def sent_any(self) -> bool:
        """True once any body byte has been written to a backend."""
        return self._sent_any

    @property
    def can_replay(self) -> bool:
        """True while every byte received so far is still held for another attempt."""
        return self.replayable or not self._sent_any

    def feed(self, data: bytes) -> None:
        """Take a chunk from the client; raises :class:`BodyTooLarge` past ``max_bytes``."""
        self.size += len(data)
        self.fed_at_s = time.monotonic()
        if self.size > self.max_bytes:
            raise BodyTooLarge(f"request body exceeds the limit of {self.max_bytes} bytes")
        sink = self.sink
        if sink is not None:
            sink.write(chunk(data) if self.chunked else data)
            self._sent_any = True
            if self.replayable:
                if self.size > self.replay_bytes:
                    self.replayable = False
                    self._chunks.clear()
                else:
                    self._chunks.append(data)
            return
        self._chunks.append(data)
        if self.replayable and self.size > self.replay_bytes:
            self.replayable = False
        hold = self._collect_limit or self.hold_bytes
        if self.size > hold and not self._holding and self._on_hold is not None:
            self._holding = True
            self._on_hold(True)
            self._wake()  # a collector over its limit gives up

    def finish(self, trailers: Headers) -> None:
        """The client's message is complete."""
        self.complete = True
        self.trailers = trailers
        if self.sink is not None and self.chunked:
            self.sink.write(last_chunk(trailers))
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        completion = self._completion
        if self.complete and completion is not None and not completion.done():
            completion.set_result(None)

    async def completed(self) -> None:
        """Wait until the client has sent the whole body, without taking any of it."""
        if self.complete:
            return
        if self._completion is None:
            self._completion = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._completion)

    async def collect(self, limit: int) -> bytes:
        """Wait for the whole body and return it; it stays held, to be forwarded as it came.

        Raises :class:`BodyTooLarge` when the body is larger than ``limit``: a body that
        must be read before routing is held in memory whole, so it is bounded separately.
        """
        self._collect_limit = limit
        if self._holding and self.size <= limit and self._on_hold is not None:
            self._holding = False
            self._on_hold(False)  # reading resumes: the whole body is wanted now
        while not self.complete and self.size <= limit:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        self._waiter = None
        if self.size > limit:
            raise BodyTooLarge(
                f"request body over {limit} bytes cannot be read for routing "
                "(limits.max_inspect_bytes)"
            )
        return b"".join(self._chunks)

    def attach(self, sink: BodyWriter) -> bytes:
        """Make ``sink`` the destination; returns the held bytes (framed) to write first."""
        self.sink = sink
        chunks = self._chunks
        if self.chunked:
            out = b"".join([chunk(c) for c in chunks])
            if self.complete:
                out += last_chunk(self.trailers)
        else:
            out = b"".join(chunks)
        if chunks:
            self._sent_any = True
        if not self.replayable:
            self._chunks = []
        if self._holding:
            self._holding = False
            if self._on_hold is not None:
                self._on_hold(False)
        return out

    def head(self, n: int) -> bytes:
        """Up to ``n`` first bytes of the body, if they are still held."""
        chunks = self._chunks
        if not chunks:
            return b""
        first = chunks[0]
        return first[:n] if len(first) >= n or len(chunks) == 1 else b"".join(chunks)[:n]

    def held(self) -> bytes:
        """Every byte received so far, while the body is ``replayable`` (else a part)."""
        return b"".join(self._chunks)

    def detach(self) -> None:
        self.sink = None
