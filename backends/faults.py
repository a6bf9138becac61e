"""Fault knobs of one simulated instance, and the stream writer that applies the drop fault."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


_FAULT_CHECKS: dict[str, Callable[[Any], bool]] = {
    "error_rate": lambda v: (_is_int(v) or isinstance(v, float)) and 0.0 <= v <= 1.0,
    "error_status": lambda v: _is_int(v) and 200 <= v <= 599,
    "hang": _is_bool,
    "drop_after_chunks": lambda v: v is None or (_is_int(v) and v >= 0),
    "refuse": _is_bool,
    "unhealthy": _is_bool,
}


class Faults:
    """Fault knobs of one instance; any of them may be set at any time (default: no fault).

    ``error_rate`` (0..1): answer ``error_status`` (default 503) at once with that probability.
    ``hang``: accept requests and answer none until cleared or the client leaves; clearing it
    lets the held requests proceed. ``drop_after_chunks`` (int or None): abort a stream's TCP
    connection after that many chunks. ``refuse``: close the listening socket (and open
    connections once idle); clearing it re-opens the socket on the same port.
    ``unhealthy``: ``/health`` answers 503 (as it does while hanging).
    """

    __slots__ = (
        "_hang",
        "_hang_cleared",
        "_refuse",
        "drop_after_chunks",
        "error_rate",
        "error_status",
        "on_refuse_change",
        "unhealthy",
    )

    def __init__(self) -> None:
        self.error_rate = 0.0
        self.error_status = 503
        self.drop_after_chunks: int | None = None
        self.unhealthy = False
        self._hang = False
        self._hang_cleared = asyncio.Event()
        self._hang_cleared.set()
        self._refuse = False
        # Called after `refuse` changes; the server hooks its listener to it.
        self.on_refuse_change: Callable[[], None] | None = None

    @property
    def hang(self) -> bool:
        return self._hang

    @hang.setter
    def hang(self, value: bool) -> None:
        self._hang = value
        if value:
            self._hang_cleared.clear()
        else:
            self._hang_cleared.set()

    @property
    def refuse(self) -> bool:
        return self._refuse

    @refuse.setter
    def refuse(self, value: bool) -> None:
        changed = value != self._refuse
        self._refuse = value
        if changed and self.on_refuse_change is not None:
            self.on_refuse_change()

    async def wait_while_hung(self) -> None:
        """Return once ``hang`` is clear (at once if it is)."""
        while self._hang:
            await self._hang_cleared.wait()

    def update(self, changes: dict[str, Any]) -> None:
        """Set knobs by name, all or none; raise ``ValueError`` naming a bad one."""
        for name, value in changes.items():
            if name not in _FAULT_CHECKS:
                raise ValueError(f"unknown fault knob {name!r}")
            if not _FAULT_CHECKS[name](value):
                raise ValueError(f"bad value for {name}: {value!r}")
        for name, value in changes.items():
            setattr(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _FAULT_CHECKS}


class StreamDropped(Exception):
    """Raised inside a stream to make the handler abort the connection (drop fault)."""


class ChunkSender:
    """Writes a stream's chunks; raises :class:`StreamDropped` once ``drop_after_chunks`` says so.

    The handler catches it outside the engine's ``admit`` block, so the sequence is released
    (and counted as aborted) before the connection is cut.
    """

    def __init__(self, resp: web.StreamResponse, faults: Faults):
        self._resp = resp
        self._faults = faults
        self.sent = 0

    async def send(self, data: bytes) -> None:
        drop = self._faults.drop_after_chunks
        if drop is not None and self.sent >= drop:
            raise StreamDropped
        await self._resp.write(data)
        self.sent += 1
