"""Tests for lb.pool: eligibility, panic mode, candidates, holds, ejections and slow start."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import pytest

from lb.admission import AdmissionQueue
from lb.backend import Backend
from lb.config_resilience import OutlierDetection
from lb.load import Attempt
from lb.outlier import OutlierDetector
from lb.pool import SLOW_START_FLOOR, VIEW_MIN_ELIGIBLE, CandidateView, Pool, PoolTimeouts
from lb.strategies import RoundRobin
from lb.upstream import ConnectionPool


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, now_s: float = 1000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


def make_backends(n: int, *, weight: int = 1, max_concurrency: int | None = None) -> list[Backend]:
    # Nothing here connects anywhere: the URLs only name the backends.
    return [
        Backend.from_url(
            f"http://127.0.0.1:{9001 + i}",
            name=f"b{i}",
            weight=weight,
            max_concurrency=max_concurrency,
        )
        for i in range(n)
    ]


def make_pool(
    backends: list[Backend],
    *,
    clock: Callable[[], float],
    panic_threshold: float = 0.0,
    slow_start_s: float = 0.0,
    consecutive_failures: int = 2,
    base_ejection_s: float = 10.0,
) -> Pool:
    """A pool over ``backends``; panic mode is off unless a threshold is given."""
    return Pool(
        "p",
        backends,
        RoundRobin(backends),
        {b: ConnectionPool(b) for b in backends},
        PoolTimeouts(),
        outliers=OutlierDetector(
            OutlierDetection(
                consecutive_failures=consecutive_failures, base_ejection_s=base_ejection_s
            )
        ),
        queue=AdmissionQueue(max_queue=10, timeout_s=1.0, reject_status=503, retry_after_s=1),
        panic_threshold=panic_threshold,
        slow_start_s=slow_start_s,
        clock=clock,
    )


def eject(pool: Pool, backend: Backend, failures: int = 2) -> None:
    for _ in range(failures):
        pool.attempt_ended(backend, failed=True)


# -- eligibility ------------------------------------------------------------------------------


def test_every_backend_is_eligible_in_a_fresh_pool() -> None:
    """A new pool with all backends healthy has all of them eligible and is not panicking."""
    backends = make_backends(3)
    pool = make_pool(backends, clock=FakeClock(), panic_threshold=0.5)
    assert pool.eligible == tuple(backends)
    assert not pool.panicking


def test_pool_built_outside_a_running_loop_does_not_fail() -> None:
    """Holds, ejections and slow start work on a pool built with no event loop running."""
    clock = FakeClock()
    backends = make_backends(3)
    pool = make_pool(backends, clock=clock, slow_start_s=10.0)
    pool.hold(backends[0], 5.0)
    eject(pool, backends[1])
    clock.advance(60.0)
    pool.refresh()
    pool.begin_slow_start(backends[2])
    assert pool.eligible == tuple(backends)
    pool.close()


@pytest.mark.parametrize("flag", ["unhealthy", "drained", "ejected", "held"])
def test_refresh_leaves_an_unavailable_backend_out_of_eligible(flag: str) -> None:
    """A backend that is unhealthy, drained, ejected or held is not eligible after refresh."""
    clock = FakeClock()
    backends = make_backends(3)
    out = backends[1]
    pool = make_pool(backends, clock=clock)
    if flag == "unhealthy":
        out.healthy = False
    elif flag == "drained":
        out.drained = True
    elif flag == "ejected":
        out.ejected_until_s = clock() + 5.0
    else:
        out.held_until_s = clock() + 5.0
    pool.refresh()
    assert pool.eligible == (backends[0], backends[2])
    assert not out.available


def test_backend_whose_ejection_ran_out_is_eligible_again() -> None:
    """Once the clock passes the end of an ejection the backend is eligible after refresh."""
    clock = FakeClock()
    backends = make_backends(3)
    pool = make_pool(backends, clock=clock)
    backends[0].ejected_until_s = clock() + 5.0
    pool.refresh()
    clock.advance(5.0)
    pool.refresh()
    assert pool.eligible == tuple(backends)


def test_backend_whose_health_returns_is_eligible_again() -> None:
    """A backend whose health check passes again is eligible after health_changed."""
    backends = make_backends(3)
    pool = make_pool(backends, clock=FakeClock())
    backends[2].healthy = False
    pool.health_changed(backends[2], False)
    backends[2].healthy = True
    pool.health_changed(backends[2], True)
    assert pool.eligible == tuple(backends)


# -- panic ------------------------------------------------------------------------------------


def test_pool_panics_and_balances_over_all_backends_below_the_threshold() -> None:
    """With 1 of 4 backends available and a 0.5 threshold, all 4 are eligible."""
    backends = make_backends(4)
    pool = make_pool(backends, clock=FakeClock(), panic_threshold=0.5)
    for b in backends[1:]:
        b.healthy = False
    pool.refresh()
    assert pool.panicking
    assert pool.eligible == tuple(backends)


def test_drained_backends_are_never_eligible_even_in_panic() -> None:
    """In panic mode the eligible set is every backend except the drained ones."""
    backends = make_backends(5)
    pool = make_pool(backends, clock=FakeClock(), panic_threshold=0.5)
    backends[4].drained = True
    for b in backends[1:4]:
        b.healthy = False
    pool.refresh()
    assert pool.panicking
    assert pool.eligible == tuple(backends[:4])


def test_pool_does_not_panic_at_exactly_the_threshold() -> None:
    """With 2 of 4 backends available and a 0.5 threshold, only the available two are eligible."""
    backends = make_backends(4)
    pool = make_pool(backends, clock=FakeClock(), panic_threshold=0.5)
    backends[2].healthy = backends[3].healthy = False
    pool.refresh()
    assert not pool.panicking
    assert pool.eligible == (backends[0], backends[1])


def test_pool_leaves_panic_when_enough_backends_come_back() -> None:
    """A panicking pool returns to the available set once enough backends recover."""
    backends = make_backends(4)
    pool = make_pool(backends, clock=FakeClock(), panic_threshold=0.5)
    for b in backends[1:]:
        b.healthy = False
    pool.refresh()
    backends[1].healthy = True
    pool.refresh()
    assert not pool.panicking
    assert pool.eligible == (backends[0], backends[1])


def test_pool_with_every_backend_drained_has_none_eligible_and_does_not_panic() -> None:
    """A fully drained pool offers no backend at all."""
    backends = make_backends(2)
    pool = make_pool(backends, clock=FakeClock(), panic_threshold=0.5)
    for b in backends:
        b.drained = True
    pool.refresh()
    assert pool.eligible == ()
    assert not pool.panicking


# -- candidates -------------------------------------------------------------------------------


def test_candidates_exclude_backends_already_tried() -> None:
    """Backends already tried for the request are not candidates for its next attempt."""
    backends = make_backends(3)
    pool = make_pool(backends, clock=FakeClock())
    assert list(pool.candidates([backends[0], backends[2]])) == [backends[1]]


def test_candidates_without_tries_are_the_eligible_backends() -> None:
    """A first attempt may go to any eligible backend."""
    backends = make_backends(3)
    pool = make_pool(backends, clock=FakeClock())
    backends[0].healthy = False
    pool.refresh()
    assert list(pool.candidates([])) == [backends[1], backends[2]]


def test_candidates_exclude_backends_at_their_concurrency_limit() -> None:
    """A backend holding max_concurrency requests is not a candidate until one ends."""
    backends = make_backends(3, max_concurrency=2)
    pool = make_pool(backends, clock=FakeClock())
    held = [Attempt(backends[1]), Attempt(backends[1])]
    assert list(pool.candidates([])) == [backends[0], backends[2]]
    held[0].finish()
    assert list(pool.candidates([])) == backends


def test_candidates_exclude_both_tried_and_full_backends() -> None:
    """Tried and full backends are both left out of the candidates."""
    backends = make_backends(4, max_concurrency=1)
    pool = make_pool(backends, clock=FakeClock())
    Attempt(backends[3])
    assert list(pool.candidates([backends[0]])) == [backends[1], backends[2]]


def test_first_attempt_candidates_are_the_same_tuple_until_eligibility_changes() -> None:
    """Without tries or limits the pool hands out its eligible tuple itself, rebuilt on refresh."""
    backends = make_backends(3)
    pool = make_pool(backends, clock=FakeClock())
    first = pool.candidates([])
    assert pool.candidates([]) is first
    backends[1].healthy = False
    pool.refresh()
    assert list(pool.candidates([])) == [backends[0], backends[2]]
    assert pool.candidates([]) is not first


def test_retry_candidates_view_indexes_iterates_and_answers_membership() -> None:
    """The view of a retry's candidates behaves as the list of untried backends would."""
    backends = make_backends(VIEW_MIN_ELIGIBLE + 4)
    pool = make_pool(backends, clock=FakeClock())
    tried = [backends[4], backends[0], backends[2], backends[-1]]
    view = pool.candidates(tried)
    expected = [b for b in backends if b not in tried]
    size = len(expected)
    assert isinstance(view, CandidateView)
    assert len(view) == size
    assert [view[i] for i in range(size)] == expected
    assert [view[i] for i in range(-size, 0)] == expected
    assert view[1:] == expected[1:]
    assert list(view) == expected
    assert all(b in view for b in expected)
    assert not any(b in view for b in tried)
    assert make_backends(1)[0] not in view
    with pytest.raises(IndexError):
        view[size]


def test_tried_backend_that_is_not_eligible_changes_nothing() -> None:
    """A tried backend that has since become unavailable leaves the eligible tuple as it is."""
    backends = make_backends(VIEW_MIN_ELIGIBLE + 2)
    pool = make_pool(backends, clock=FakeClock())
    backends[0].healthy = False
    pool.refresh()
    assert pool.candidates([backends[0]]) is pool.eligible


def test_full_candidates_are_read_at_each_call() -> None:
    """A backend that fills up between two calls is left out of the second one."""
    backends = make_backends(4, max_concurrency=2)
    pool = make_pool(backends, clock=FakeClock())
    assert list(pool.candidates([])) == backends
    Attempt(backends[2])
    Attempt(backends[2])
    assert list(pool.candidates([])) == [backends[0], backends[1], backends[3]]
    assert list(pool.candidates([backends[3]])) == [backends[0], backends[1]]


def test_full_backends_of_a_large_pool_are_left_out_by_a_view() -> None:
    """In a pool of 40, the backends at their limit and the tried ones are left out without
    copying the rest, and a backend whose attempt ends is a candidate again."""
    backends = make_backends(40, max_concurrency=1)
    pool = make_pool(backends, clock=FakeClock())
    held = {i: Attempt(backends[i]) for i in (3, 17, 39)}
    view = pool.candidates([backends[5]])
    assert isinstance(view, CandidateView)
    assert list(view) == [b for i, b in enumerate(backends) if i not in (3, 5, 17, 39)]
    held[17].finish()
    assert backends[17] in pool.candidates([])
    assert backends[3] not in pool.candidates([])


def test_a_reloaded_pool_knows_which_kept_backends_are_full() -> None:
    """A pool built over backends with attempts still running (a reload) starts from their
    counts: the full one is left out and its totals match."""
    backends = make_backends(3, max_concurrency=1)
    make_pool(backends, clock=FakeClock())
    running = Attempt(backends[0])
    reloaded = make_pool(backends, clock=FakeClock())
    assert list(reloaded.candidates([])) == backends[1:]
    assert reloaded.load.in_flight == 1
    running.finish()
    assert list(reloaded.candidates([])) == backends
    assert reloaded.load.in_flight == 0


# -- hold -------------------------------------------------------------------------------------


def test_hold_takes_a_backend_out_until_the_clock_passes() -> None:
    """A backend held for 5 s is out until the clock reaches the end of the hold."""
    clock = FakeClock()
    backends = make_backends(3)
    pool = make_pool(backends, clock=clock)
    pool.hold(backends[0], 5.0)
    assert backends[0] not in pool.eligible
    clock.advance(4.9)
    pool.refresh()
    assert backends[0] not in pool.eligible
    clock.advance(0.1)
    pool.refresh()
    assert backends[0] in pool.eligible


def test_shorter_hold_does_not_cut_a_longer_one_short() -> None:
    """A second, shorter Retry-After leaves the longer hold in place."""
    clock = FakeClock()
    backends = make_backends(2)
    pool = make_pool(backends, clock=clock)
    pool.hold(backends[0], 10.0)
    pool.hold(backends[0], 1.0)
    clock.advance(5.0)
    pool.refresh()
    assert backends[0] not in pool.eligible


async def test_hold_ends_by_itself_in_a_running_loop() -> None:
    """In a running loop the pool brings a held backend back when the hold runs out."""
    backends = make_backends(2)
    pool = make_pool(backends, clock=time.monotonic)
    try:
        pool.hold(backends[0], 0.05)
        assert backends[0] not in pool.eligible
        for _ in range(100):
            if backends[0] in pool.eligible:
                break
            await asyncio.sleep(0.02)
        assert backends[0] in pool.eligible
    finally:
        pool.close()


# -- ejection ---------------------------------------------------------------------------------


def test_failures_reported_to_the_pool_eject_the_backend(caplog: pytest.LogCaptureFixture) -> None:
    """consecutive_failures failed attempts take the backend out of eligible; the warning
    carries the event, pool and backend as fields."""
    backends = make_backends(3)
    pool = make_pool(backends, clock=FakeClock(), consecutive_failures=2)
    pool.attempt_ended(backends[0], failed=True)
    assert backends[0] in pool.eligible
    with caplog.at_level(logging.WARNING, logger="lb.pool"):
        pool.attempt_ended(backends[0], failed=True)
    assert backends[0] not in pool.eligible
    assert pool.ejected_count() == 1
    (record,) = caplog.records
    fields = (record.event, record.pool, record.backend, record.failures)  # type: ignore[attr-defined]
    assert fields == ("ejected", pool.name, backends[0].name, 2)


def test_the_end_of_an_ejection_by_its_time_running_out_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An ejection's start is logged, and so is its end when its time runs out (not only
    when a health check ends it early), once."""
    clock = FakeClock()
    backends = make_backends(3)
    pool = make_pool(backends, clock=clock, consecutive_failures=1)
    with caplog.at_level(logging.INFO, logger="lb.pool"):
        pool.attempt_ended(backends[0], failed=True)
        clock.advance(3600.0)
        pool.refresh()
        pool.refresh()
    events = [(r.event, getattr(r, "reason", None)) for r in caplog.records]  # type: ignore[attr-defined]
    assert events == [("ejected", None), ("ejection_ended", "expired")]
    assert backends[0] in pool.eligible


def test_abandoned_attempts_do_not_count_towards_ejection() -> None:
    """Attempts the client abandoned tell nothing about the backend and never eject it."""
    backends = make_backends(3)
    pool = make_pool(backends, clock=FakeClock(), consecutive_failures=2)
    for _ in range(5):
        pool.attempt_ended(backends[0], failed=True, observed=False)
    assert backends[0] in pool.eligible


def test_pool_never_ejects_more_than_its_maximum() -> None:
    """With both backends of a pool of two failing, only one is ejected."""
    backends = make_backends(2)
    pool = make_pool(backends, clock=FakeClock(), consecutive_failures=2)
    for b in backends:
        eject(pool, b)
    assert pool.ejected_count() == 1
    assert len(pool.eligible) == 1


def test_health_probe_passing_ends_an_ejection_early() -> None:
    """A passing active health check brings an ejected backend back at once."""
    backends = make_backends(3)
    pool = make_pool(backends, clock=FakeClock(), base_ejection_s=30.0)
    eject(pool, backends[0])
    pool.health_probe_passed(backends[0])
    assert backends[0] in pool.eligible
    assert pool.ejected_count() == 0


def test_health_probe_passing_leaves_a_held_backend_held() -> None:
    """A passing health check does not override a backend's Retry-After."""
    backends = make_backends(3)
    pool = make_pool(backends, clock=FakeClock())
    pool.hold(backends[0], 30.0)
    pool.health_probe_passed(backends[0])
    assert backends[0] not in pool.eligible


def test_ejection_ended_early_by_a_probe_is_not_forgiven_by_the_next_success() -> None:
    """After a probe cuts an ejection short, one success does not reset the ejection growth."""
    clock = FakeClock()
    backends = make_backends(3)
    pool = make_pool(backends, clock=clock, consecutive_failures=2, base_ejection_s=10.0)
    eject(pool, backends[0])  # first ejection: 10 s
    clock.advance(1.0)
    pool.health_probe_passed(backends[0])
    pool.attempt_ended(backends[0], failed=False)  # back for no time at all
    clock.advance(1.0)
    eject(pool, backends[0])
    assert backends[0].ejected_until_s - clock() == 20.0  # second in the streak: 2 x 10 s


# -- slow start -------------------------------------------------------------------------------


def test_backend_coming_back_starts_at_a_tenth_of_its_weight() -> None:
    """With slow start on, a backend that becomes available again starts at 10% of its weight."""
    backends = make_backends(2, weight=5)
    pool = make_pool(backends, clock=FakeClock(), slow_start_s=30.0)
    backends[0].healthy = False
    pool.refresh()
    backends[0].healthy = True
    pool.refresh()
    assert backends[0].effective_weight == pytest.approx(5 * SLOW_START_FLOOR)
    assert backends[1].effective_weight == 5.0


def test_backend_back_from_ejection_starts_slow() -> None:
    """A backend whose ejection ran out starts again at 10% of its weight."""
    clock = FakeClock()
    backends = make_backends(3, weight=4)
    pool = make_pool(backends, clock=clock, slow_start_s=30.0, base_ejection_s=10.0)
    eject(pool, backends[0])
    clock.advance(10.0)
    pool.refresh()
    assert backends[0] in pool.eligible
    assert backends[0].effective_weight == pytest.approx(0.4)


def test_backends_of_a_new_pool_start_at_full_weight() -> None:
    """Slow start applies to backends coming back, not to those present from the start."""
    backends = make_backends(2, weight=3)
    make_pool(backends, clock=FakeClock(), slow_start_s=30.0)
    assert [b.effective_weight for b in backends] == [3.0, 3.0]


def test_without_slow_start_a_returning_backend_gets_its_full_weight() -> None:
    """With slow_start_s 0 a backend that comes back takes its full weight at once."""
    backends = make_backends(2, weight=5)
    pool = make_pool(backends, clock=FakeClock(), slow_start_s=0.0)
    backends[0].healthy = False
    pool.refresh()
    backends[0].healthy = True
    pool.refresh()
    assert backends[0].effective_weight == 5.0


async def test_slow_start_ramps_up_to_the_full_weight() -> None:
    """In a running loop the weight climbs, never falling, to the full weight."""
    backends = make_backends(2, weight=10)
    pool = make_pool(backends, clock=time.monotonic, slow_start_s=0.6)
    try:
        backends[0].healthy = False
        pool.refresh()
        backends[0].healthy = True
        pool.refresh()
        seen = [backends[0].effective_weight]
        for _ in range(150):
            if seen[-1] == 10.0:
                break
            await asyncio.sleep(0.02)
            seen.append(backends[0].effective_weight)
        assert seen[0] == pytest.approx(1.0)
        assert seen[-1] == 10.0
        assert seen == sorted(seen)
        assert any(1.0 < w < 10.0 for w in seen)  # it ramped rather than jumped
    finally:
        pool.close()
