"""Tests for lb.outlier: passive ejection after failures in a row, for a growing, capped time."""

from __future__ import annotations

import pytest

from lb.backend import Backend
from lb.config_resilience import OutlierDetection
from lb.outlier import OutlierDetector

# Pool size and ejected count that never stand in the way of an ejection.
ROOMY_POOL = 10


def make_backend() -> Backend:
    return Backend.from_url("http://127.0.0.1:9001")


def make_detector(**settings: object) -> OutlierDetector:
    config: dict[str, object] = {
        "consecutive_failures": 3,
        "base_ejection_s": 10.0,
        "max_ejection_s": 300.0,
    }
    config.update(settings)
    return OutlierDetector(OutlierDetection.model_validate(config))


def fail(detector: OutlierDetector, backend: Backend, times: int, now_s: float) -> list[bool]:
    """Report ``times`` failures at ``now_s``; the verdict of each."""
    return [detector.observe(backend, True, now_s, ROOMY_POOL, 0) for _ in range(times)]


def succeed(detector: OutlierDetector, backend: Backend, now_s: float) -> bool:
    return detector.observe(backend, False, now_s, ROOMY_POOL, 0)


def test_backend_is_ejected_by_exactly_the_threshold_failure() -> None:
    """With a threshold of 3, the first two failures in a row do not eject and the third does."""
    detector, backend = make_detector(consecutive_failures=3), make_backend()
    assert fail(detector, backend, 3, now_s=100.0) == [False, False, True]
    assert backend.ejected_until_s == 110.0
    assert backend.ejections == 1
    assert backend.ejections_total == 1


def test_threshold_of_one_ejects_on_the_first_failure() -> None:
    """A threshold of 1 ejects a backend on its first failure."""
    detector, backend = make_detector(consecutive_failures=1), make_backend()
    assert fail(detector, backend, 1, now_s=100.0) == [True]


def test_a_success_resets_the_streak_of_failures() -> None:
    """Failures broken by a success must start counting again from zero."""
    detector, backend = make_detector(consecutive_failures=3), make_backend()
    fail(detector, backend, 2, now_s=100.0)
    assert not succeed(detector, backend, now_s=100.0)
    assert fail(detector, backend, 3, now_s=100.0) == [False, False, True]


def test_a_success_never_ejects() -> None:
    """Any number of successes never eject a backend."""
    detector, backend = make_detector(consecutive_failures=1), make_backend()
    assert not any(succeed(detector, backend, now_s=100.0 + i) for i in range(50))
    assert backend.ejected_until_s == 0.0


def test_failures_of_one_backend_do_not_count_for_another() -> None:
    """Streaks are kept per backend."""
    detector = make_detector(consecutive_failures=3)
    a, b = make_backend(), make_backend()
    fail(detector, a, 2, now_s=100.0)
    fail(detector, b, 2, now_s=100.0)
    assert fail(detector, a, 1, now_s=100.0) == [True]
    assert b.ejected_until_s == 0.0


def test_failures_while_ejected_do_not_extend_the_ejection() -> None:
    """Failures reported during an ejection (attempts already in flight) do not eject again."""
    detector, backend = make_detector(consecutive_failures=1), make_backend()
    fail(detector, backend, 1, now_s=100.0)
    assert fail(detector, backend, 5, now_s=105.0) == [False] * 5
    assert backend.ejected_until_s == 110.0
    assert backend.ejections == 1


def test_each_ejection_in_a_streak_lasts_base_times_its_number() -> None:
    """The n-th ejection in a row lasts n times the base ejection time."""
    detector, backend = make_detector(consecutive_failures=2, base_ejection_s=10.0), make_backend()
    now = 100.0
    durations = []
    for _ in range(4):
        fail(detector, backend, 2, now_s=now)
        durations.append(backend.ejected_until_s - now)
        now = backend.ejected_until_s  # back in, and failing again at once
    assert durations == [10.0, 20.0, 30.0, 40.0]


def test_ejection_time_is_capped_at_the_maximum() -> None:
    """Ejections stop growing at max_ejection_s."""
    detector = make_detector(consecutive_failures=1, base_ejection_s=10.0, max_ejection_s=25.0)
    backend = make_backend()
    now = 100.0
    durations = []
    for _ in range(5):
        fail(detector, backend, 1, now_s=now)
        durations.append(backend.ejected_until_s - now)
        now = backend.ejected_until_s
    assert durations == [10.0, 20.0, 25.0, 25.0, 25.0]
    assert backend.ejections_total == 5


@pytest.mark.parametrize("pool_size", [0, 1])
def test_a_pool_of_one_may_eject_nobody(pool_size: int) -> None:
    """A pool of one (or none) never ejects its only backend."""
    assert make_detector(max_ejection_percent=100.0).max_ejected(pool_size) == 0


@pytest.mark.parametrize("pool_size", [2, 3, 5, 9])
def test_a_pool_of_two_or_more_may_always_eject_one(pool_size: int) -> None:
    """Even a tiny (or zero) percentage allows one ejection in a pool of two or more."""
    assert make_detector(max_ejection_percent=0.0).max_ejected(pool_size) == 1


@pytest.mark.parametrize(
    ("pool_size", "percent", "expected"),
    [(4, 50.0, 2), (5, 50.0, 2), (10, 50.0, 5), (10, 35.0, 3), (20, 10.0, 2), (7, 100.0, 7)],
)
def test_max_ejected_is_the_floor_of_the_percentage(
    pool_size: int, percent: float, expected: int
) -> None:
    """The number that may be ejected is the percentage of the pool, rounded down."""
    assert make_detector(max_ejection_percent=percent).max_ejected(pool_size) == expected


def test_max_ejected_is_exact_for_every_whole_percentage() -> None:
    """For whole percentages the limit equals size * percent // 100, with no rounding error."""
    wrong = []
    for pool_size in range(2, 201):
        for percent in range(101):
            got = make_detector(max_ejection_percent=float(percent)).max_ejected(pool_size)
            if got != max(1, pool_size * percent // 100):
                wrong.append((pool_size, percent, got))
    assert wrong == []


def test_ejection_is_refused_when_the_pool_has_its_maximum_ejected() -> None:
    """A backend that reaches the threshold stays in when the pool already has max ejected."""
    detector, backend = make_detector(consecutive_failures=1), make_backend()
    assert not detector.observe(backend, True, 100.0, pool_size=2, ejected_now=1)
    assert backend.ejected_until_s == 0.0
    assert backend.ejections == 0


def test_refused_backend_is_ejected_once_room_frees_up() -> None:
    """A backend refused ejection is ejected by its next failure after another comes back."""
    detector, backend = make_detector(consecutive_failures=2), make_backend()
    for _ in range(3):
        detector.observe(backend, True, 100.0, pool_size=2, ejected_now=1)
    assert detector.observe(backend, True, 101.0, pool_size=2, ejected_now=0)


def test_disabled_detection_never_ejects() -> None:
    """With enabled=False no run of failures ejects a backend."""
    detector, backend = make_detector(enabled=False, consecutive_failures=1), make_backend()
    assert fail(detector, backend, 100, now_s=100.0) == [False] * 100
    assert backend.ejected_until_s == 0.0
    assert backend.ejections_total == 0


def test_streak_is_forgiven_after_serving_cleanly_for_the_last_ejection_length() -> None:
    """A success once the backend has been back for as long as it was out resets the growth."""
    detector, backend = make_detector(consecutive_failures=1, base_ejection_s=10.0), make_backend()
    fail(detector, backend, 1, now_s=100.0)  # out 100..110
    fail(detector, backend, 1, now_s=110.0)  # out 110..130 (second in the streak)
    succeed(detector, backend, now_s=150.0)  # back for 20 s, as long as it was out
    assert backend.ejections == 0
    fail(detector, backend, 1, now_s=151.0)
    assert backend.ejected_until_s == 161.0


def test_streak_is_not_forgiven_before_the_last_ejection_length_has_passed() -> None:
    """A success sooner than the last ejection's length after it ended keeps the growth."""
    detector, backend = make_detector(consecutive_failures=1, base_ejection_s=10.0), make_backend()
    fail(detector, backend, 1, now_s=100.0)  # out 100..110
    fail(detector, backend, 1, now_s=110.0)  # out 110..130
    succeed(detector, backend, now_s=149.0)  # back for only 19 s
    assert backend.ejections == 2
    fail(detector, backend, 1, now_s=149.5)
    assert backend.ejected_until_s == 149.5 + 30.0


def test_failure_status_set_comes_from_the_config() -> None:
    """Only the configured statuses count as failures; 429 is load, not sickness, by default."""
    detector = make_detector()
    assert detector.is_failure_status(503)
    assert not detector.is_failure_status(429)
    assert make_detector(failure_statuses=[429]).is_failure_status(429)
