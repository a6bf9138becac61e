"""A tiny user-supplied strategy module, loaded by import path in the registry tests."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lb.backend import Backend
from lb.strategies import RequestInfo, Strategy


class FirstBackend(Strategy):
    """Always the first candidate: the simplest strategy a user could plug in."""

    name = "first_backend"

    def pick(self, candidates: Sequence[Backend], request: RequestInfo) -> Backend:
        return candidates[0]


class NumberedReasons(Strategy):
    """The first candidate, with a reason no earlier pick gave (``pick 1``, ``pick 2``...)."""

    name = "numbered"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.picks = 0

    def pick(self, candidates: Sequence[Backend], request: RequestInfo) -> Backend:
        self.picks += 1
        return candidates[0]

    def explain(self, backend: Backend, request: RequestInfo) -> str:
        return f"pick {self.picks}"


class NotAStrategy:
    """A class that does not derive from Strategy."""


class Unfinished(Strategy):
    """A Strategy subclass that forgot to implement pick, so it stays abstract."""


class Broken(Strategy):
    """A strategy whose constructor fails with something other than ValueError."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("model catalogue unavailable")

    def pick(self, candidates: Sequence[Backend], request: RequestInfo) -> Backend:
        return candidates[0]


class Exits(Strategy):
    """A strategy whose constructor ends the process, as a careless script might."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        sys.exit(3)

    def pick(self, candidates: Sequence[Backend], request: RequestInfo) -> Backend:
        return candidates[0]


NOT_A_CLASS = 42
