"""Tests for the pure parts of ``make bench-soak``: memory readings, trends, the proxy's
config and the report. No process is started."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import yaml

from benchmarks.soak import Settings, proxy_config, write_results
from benchmarks.soak_memory import (
    FLAT_GROWTH_KIB,
    Sample,
    parse_kib_fields,
    per_stream_kib,
    read_memory,
    slope_per_min,
    trend,
)
from lb.config import parse_config

STATUS = """Name:\tpython
VmPeak:\t  300000 kB
VmHWM:\t   70000 kB
VmRSS:\t   65536 kB
RssAnon:\t   45000 kB
RssFile:\t   20536 kB
Threads:\t1
"""


DEFAULTS = Settings(
    streams=1000,
    duration_s=600,
    sample_s=10.0,
    settle_s=60.0,
    event_interval_s=30.0,
    rate_per_s=200.0,
    churn=50,
    churn_every_s=30.0,
)


def sample(t_s: float, rss_kib: int) -> Sample:
    return Sample(t_s, rss_kib, rss_kib - 20_000, None, None, 1000, 0)


def test_status_fields_are_read_in_kib_under_their_new_names() -> None:
    """VmRSS, RssAnon and VmHWM lines become rss_kib, rss_anon_kib and hwm_kib."""
    fields = {"VmRSS": "rss_kib", "RssAnon": "rss_anon_kib", "VmHWM": "hwm_kib"}
    assert parse_kib_fields(STATUS, fields) == {
        "rss_kib": 65536,
        "rss_anon_kib": 45000,
        "hwm_kib": 70000,
    }


def test_reading_this_process_gives_rss_and_open_fds() -> None:
    """The reader works on a live process: RSS above zero, fds counted."""
    reading = read_memory(os.getpid())
    assert reading["rss_kib"] > 0
    assert reading["rss_anon_kib"] > 0
    assert reading["fds"] >= 3


def test_slope_is_per_minute_and_needs_two_distinct_times() -> None:
    """A rise of 10 KiB every 10 s is 60 KiB/min; one point or one time gives no slope."""
    assert slope_per_min([(0.0, 100.0), (10.0, 110.0), (20.0, 120.0)]) == 60.0
    assert slope_per_min([(0.0, 100.0)]) is None
    assert slope_per_min([(5.0, 100.0), (5.0, 200.0)]) is None


def test_per_stream_memory_spreads_the_difference_over_the_streams() -> None:
    """11,000 KiB more with 1,000 streams open is 11 KiB per stream."""
    assert per_stream_kib(50_000, 61_000, 1000) == 11.0
    assert per_stream_kib(50_000, 61_000, 0) is None


def test_trend_ignores_readings_before_settling_and_judges_growth_after() -> None:
    """A jump while settling does not count; a rise of 1 MiB or more after it is not flat."""
    flat = [sample(0, 50_000), sample(30, 60_000), sample(60, 60_000), sample(70, 60_500)]
    result = trend(flat, settle_s=60)
    assert result["samples"] == 2
    assert result["growth_kib"] == 500
    assert result["flat"] is True
    grows = [*flat, sample(80, 60_000 + FLAT_GROWTH_KIB)]
    assert trend(grows, settle_s=60)["flat"] is False
    assert trend(flat, settle_s=1000)["flat"] is None


def test_growth_counts_from_the_first_reading_after_settling_to_the_highest() -> None:
    """A reading that dips and comes back is spread (max - min), not growth."""
    readings = [sample(60, 60_000), sample(70, 59_000), sample(80, 60_200)]
    result = trend(readings, settle_s=60)
    assert result["growth_kib"] == 200
    assert result["max_minus_min_kib"] == 1200


def test_streams_outlast_the_run_and_the_proxy_config_allows_them() -> None:
    """Each stream has events past the end of the run, and the config is valid with room for
    every stream and an idle timeout longer than the gap between events."""
    s = dataclasses.replace(DEFAULTS, streams=20_000)
    assert s.chunks * s.event_interval_s > s.duration_s + 60
    text = proxy_config(8080, 8081, 9000, s)
    config = parse_config(yaml.safe_load(text), "soak.yaml")
    assert config.limits.max_connections >= 2 * s.streams
    assert config.timeouts.idle_s is None or config.timeouts.idle_s > s.event_interval_s
    assert config.workers == 1
    assert config.pools[0].admission.max_concurrency is None


def test_results_are_written_as_json_markdown_and_latest(tmp_path: Path) -> None:
    """A run's document becomes soak-<date>-<host>.json and .md, and soak-latest.md."""
    level = {"rss_kib": 50_000, "rss_anon_kib": 30_000, "pss_kib": 49_000, "fds": 20}
    samples = [sample(t, 61_000) for t in (0, 10, 20)]
    results = {
        "date": "2026-11-22",
        "host": "vm",
        "machine": {
            "cpu_model": "CPU",
            "cpu_count": 2,
            "memory_gib": 4.0,
            "kernel": "6",
            "python": "3.11",
            "packages": {"uvloop": "0.21"},
            "git_commit": "abc",
            "git_dirty": False,
        },
        "settings": {**dataclasses.asdict(DEFAULTS), "chunks": 31},
        "memory": {
            "at_rest": level,
            "with_streams": {**level, "rss_kib": 61_000},
            "after_close": level,
            "streams_opened": 1000,
            "per_stream_kib": 11.0,
            "per_1000_streams_kib": 11_000,
            "samples": [s.__dict__ for s in samples],
            "trend_rss": trend(samples, 10),
            "trend_rss_anon": trend(samples, 10, "rss_anon_kib"),
            "requests": {"200": 10},
            "streams_churned": 0,
            "churn_errors": {},
            "stream_errors_at_end": {},
        },
    }
    json_path, md_path, latest = write_results(results, tmp_path)
    assert json_path.name == "soak-2026-11-22-vm.json"
    assert md_path.read_text() == latest.read_text()
    assert "**11.0 KiB per idle stream**" in md_path.read_text()
    assert "| RSS | 2 | 61,000 | 61,000 | 0.0 | 0 | 0 | yes |" in md_path.read_text()
