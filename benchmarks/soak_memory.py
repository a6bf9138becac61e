"""Memory of a process as the kernel reports it, and what a series of readings says.

Readings come from ``/proc/<pid>/status`` (``VmRSS``: resident memory; ``RssAnon``: its
anonymous part, the heap, which is where a leak in Python code shows; ``VmHWM``: the peak
RSS) and ``/proc/<pid>/smaps_rollup`` (``Pss``: resident memory with shared pages divided
among the processes sharing them), all in KiB, and the number of open file descriptors.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

STATUS_FIELDS = {"VmRSS": "rss_kib", "RssAnon": "rss_anon_kib", "VmHWM": "hwm_kib"}
FLAT_GROWTH_KIB = 1024  # "flat": never more than 1 MiB above the level at the end of settling


def parse_kib_fields(text: str, fields: dict[str, str]) -> dict[str, int]:
    """``{new_name: KiB}`` for each ``Name:   123 kB`` line of ``text`` named in ``fields``."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        key = fields.get(name.strip())
        if key is not None:
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0])
    return out


def read_memory(pid: int) -> dict[str, int]:
    """RSS, anonymous RSS, peak RSS and PSS in KiB, and open fds, of process ``pid``."""
    proc = Path(f"/proc/{pid}")
    reading = parse_kib_fields((proc / "status").read_text(), STATUS_FIELDS)
    try:
        reading |= parse_kib_fields((proc / "smaps_rollup").read_text(), {"Pss": "pss_kib"})
    except OSError:
        pass  # kernels before 4.14 have no smaps_rollup
    try:
        reading["fds"] = len(os.listdir(proc / "fd"))
    except OSError:
        pass
    return reading


@dataclass(frozen=True)
class Sample:
    """One reading during the soak, ``t_s`` seconds after it began."""

    t_s: float
    rss_kib: int
    rss_anon_kib: int
    pss_kib: int | None
    fds: int | None
    open_streams: int
    requests: int


def slope_per_min(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of ``(seconds, value)`` points, per minute; ``None`` below 2 points
    or when every point has the same time."""
    if len(points) < 2:
        return None
    mean_t = statistics.fmean(t for t, _ in points)
    mean_v = statistics.fmean(v for _, v in points)
    var_t = sum((t - mean_t) ** 2 for t, _ in points)
    if var_t == 0:
        return None
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var_t * 60.0


def per_stream_kib(before_kib: int, with_kib: int, streams: int) -> float | None:
    """The memory each open stream adds: the difference spread over the streams."""
    return (with_kib - before_kib) / streams if streams else None


def trend(samples: Sequence[Sample], settle_s: float, key: str = "rss_kib") -> dict[str, object]:
    """What the readings after ``settle_s`` say about ``key``: slope, spread, growth, flat.

    ``growth_kib`` is the highest reading after settling minus the first one after settling;
    the series is ``flat`` when that stays under :data:`FLAT_GROWTH_KIB`.
    """
    late = [(s.t_s, float(getattr(s, key))) for s in samples if s.t_s >= settle_s]
    if not late:
        return {"samples": 0, "slope_kib_per_min": None, "max_minus_min_kib": None,
                "growth_kib": None, "flat": None}  # fmt: skip
    values = [v for _, v in late]
    slope = slope_per_min(late)
    growth = max(values) - values[0]
    return {
        "samples": len(late),
        "first_kib": int(values[0]),
        "last_kib": int(values[-1]),
        "slope_kib_per_min": None if slope is None else round(slope, 1),
        "max_minus_min_kib": int(max(values) - min(values)),
        "growth_kib": int(growth),
        "flat": growth < FLAT_GROWTH_KIB,
    }
