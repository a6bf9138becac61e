"""nginx's smooth weighted round-robin scan, one pick at a time.

Kept apart from :mod:`lb.strategies.round_robin`, which documents the algorithm and calls this
for pools of up to ``SMOOTH_MAX_BACKENDS`` backends: strategies stay plain Python classes that
users may subclass, while this loop, run for every request, is part of the compiled data plane.
"""

from __future__ import annotations

from collections.abc import Sequence

from lb.backend import Backend


def smooth_pick(current: dict[Backend, float], candidates: Sequence[Backend]) -> Backend:
    """Add each candidate's effective weight to its current weight, take the largest (the
    first on a tie, as nginx), and take the candidates' total weight off the one taken.

    ``current`` holds every candidate (a ``KeyError`` otherwise); ``candidates`` is not empty
    and may be any iterable sequence (a tuple, a list, a pool's candidate view).
    """
    it = iter(candidates)  # not indexed: a pool's candidate view finds an index by a scan
    best = next(it)
    total = best.effective_weight
    best_current = current[best] + total
    current[best] = best_current
    for backend in it:
        weight = backend.effective_weight
        total += weight
        value = current[backend] + weight
        current[backend] = value
        if value > best_current:  # strict: ties go to the earlier backend, as in nginx
            best = backend
            best_current = value
    current[best] = best_current - total
    return best
