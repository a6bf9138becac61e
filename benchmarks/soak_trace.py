"""``python -m benchmarks.soak_trace DIR LB_ARGS...``: the proxy with allocation tracing.

Runs ``lb``'s command line in this process with :mod:`tracemalloc` on (``FRAMES`` frames per
allocation), and writes a snapshot to ``DIR/snapshot-<n>.pickle`` each time the process gets
``SIGUSR1``, and on ``SIGUSR2`` runs a full garbage collection first and writes
``DIR/snapshot-<n>-collected.pickle`` after it. ``python -m benchmarks.soak --tracemalloc``
uses it to show what grew between the start and the end of the soak, and how much of that a
full collection frees (garbage held in reference cycles, waiting for the oldest generation to
be collected); tracing makes the proxy several times slower, so memory figures from such a run
are not the ones to quote.
"""

from __future__ import annotations

import gc
import itertools
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType

from lb.cli import main as lb_main

FRAMES = 8


def top_differences(
    before: Path, after: Path, limit: int = 15, key: str = "traceback"
) -> list[dict[str, object]]:
    """The ``limit`` allocation sites that grew most from ``before`` to ``after``."""
    old = tracemalloc.Snapshot.load(str(before))
    new = tracemalloc.Snapshot.load(str(after))
    rows = []
    for diff in new.compare_to(old, key)[:limit]:
        rows.append(
            {
                "size_diff_kib": round(diff.size_diff / 1024, 1),
                "count_diff": diff.count_diff,
                "where": [f"{frame.filename}:{frame.lineno}" for frame in diff.traceback],
            }
        )
    return rows


def main(argv: list[str]) -> int:
    directory = Path(argv[0])
    counter = itertools.count()

    def snapshot(signum: int, frame: FrameType | None) -> None:
        n = next(counter)
        if signum == signal.SIGUSR2:
            gc.collect()
        suffix = "-collected" if signum == signal.SIGUSR2 else ""
        tracemalloc.take_snapshot().dump(str(directory / f"snapshot-{n}{suffix}.pickle"))

    tracemalloc.start(FRAMES)
    signal.signal(signal.SIGUSR1, snapshot)
    signal.signal(signal.SIGUSR2, snapshot)
    return lb_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
