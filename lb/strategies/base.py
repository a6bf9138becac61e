"""The strategy interface: given eligible backends, choose one. No I/O, no awaiting.

A strategy is built once per pool from the pool's full backend list and rebuilt whole when that
list changes (a config reload). For each upstream attempt the proxy filters the pool down to
the eligible candidates (healthy, not yet tried for this request) and calls :meth:`pick`.
Load numbers are read from the backends (written by :class:`lb.load.Attempt`); a strategy never
writes them. Randomness and time are injected so strategies can be tested deterministically.
"""

from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from lb.backend import Backend
from lb.request import RequestInfo

Clock = Callable[[], float]

__all__ = ["Clock", "RequestInfo", "Strategy"]


class Strategy(ABC):
    """Base class of balancing strategies, built-in and user-supplied.

    Subclasses set ``name`` (the config key, registry key and metric label) and implement
    :meth:`pick`. ``options`` holds the pool's ``strategy_options`` mapping; a strategy that
    does not understand an option raises ``ValueError`` naming it, which becomes a config error.
    """

    name: ClassVar[str] = "custom"
    # Set to True (on the class or the instance) when pick() reads the body fields of
    # RequestInfo; the proxy then reads the whole body before choosing.
    needs_body: bool = False

    def __init__(
        self,
        backends: Sequence[Backend],
        *,
        rng: random.Random | None = None,
        clock: Clock = time.monotonic,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self.backends = tuple(backends)
        self.rng = rng if rng is not None else random.Random()
        self.clock = clock
        self.options = dict(options or {})

    @abstractmethod
    def pick(self, candidates: Sequence[Backend], request: RequestInfo) -> Backend:
        """Return one of ``candidates`` (never empty) for ``request``."""

    def explain(self, backend: Backend, request: RequestInfo) -> str:
        """Why ``backend`` was the last pick for ``request``, in a few words for a header.

        Called right after :meth:`pick`, only when the explanation is wanted. The default
        names the load the backend had; strategies with a richer reason override it.
        """
        return f"in_flight {backend.in_flight}"
