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
from dataclasses import dataclass
from typing import Any, ClassVar

from lb.backend import Backend

Clock = Callable[[], float]


@dataclass(slots=True)
class RequestInfo:
    """What a strategy may know about the request being placed.

    ``key`` is an affinity key (a session id, a prompt prefix) for strategies that use one;
    ``None`` when the pool's configuration names none.
    """

    method: str
    path: str
    key: str | None = None


class Strategy(ABC):
    """Base class of balancing strategies, built-in and user-supplied.

    Subclasses set ``name`` (the config key, registry key and metric label) and implement
    :meth:`pick`. ``options`` holds the pool's ``strategy_options`` mapping; a strategy that
    does not understand an option raises ``ValueError`` naming it, which becomes a config error.
    """

    name: ClassVar[str] = "custom"

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
