"""Tests for lb.load: the Attempt guard and the peak-EWMA latency estimate it writes."""

from __future__ import annotations

import asyncio
import itertools
import math

import pytest

from lb.backend import DEFAULT_RTT_S, Backend
from lb.load import FAILURE_FLOOR_S, MAX_RTT_S, Attempt, is_failure_status, record_rtt

DECAY_S = 10.0


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, now_s: float = 1000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


def make_backend() -> Backend:
    return Backend.from_url("http://127.0.0.1:9001")


def attempt(backend: Backend, clock: FakeClock) -> Attempt:
    return Attempt(backend, clock=clock, decay_s=DECAY_S)


# -- the in-flight slot -----------------------------------------------------------------------


def test_creating_an_attempt_takes_an_in_flight_slot() -> None:
    """A new Attempt raises the backend's in-flight count and request total by one."""
    backend = make_backend()
    attempt(backend, FakeClock())
    attempt(backend, FakeClock())
    assert backend.in_flight == 2
    assert backend.requests_total == 2


def test_finish_releases_the_slot_exactly_once_however_often_it_is_called() -> None:
    """Calling finish repeatedly, with any arguments, gives the slot back only once."""
    backend = make_backend()
    other = attempt(backend, FakeClock())
    guard = attempt(backend, FakeClock())
    guard.finish()
    guard.finish(failed=True)
    guard.finish(abandoned=True)
    guard.finish()
    assert backend.in_flight == 1
    assert guard.done
    assert not other.done


def test_only_the_first_finish_counts_the_outcome() -> None:
    """A success followed by a late finish(failed=True) stays a success."""
    backend = make_backend()
    guard = attempt(backend, FakeClock())
    guard.response_started(200)
    guard.finish()
    guard.finish(failed=True)
    assert backend.failures_total == 0
    assert backend.responses_by_class[2] == 1


def test_context_manager_releases_the_slot_on_success() -> None:
    """Leaving the with-block normally gives the slot back and counts no failure."""
    backend = make_backend()
    with attempt(backend, FakeClock()) as guard:
        guard.response_started(200)
    assert backend.in_flight == 0
    assert backend.failures_total == 0


def test_context_manager_releases_the_slot_and_counts_a_failure_on_an_exception() -> None:
    """An exception inside the with-block gives the slot back and counts as a failure."""
    backend = make_backend()
    with pytest.raises(ConnectionResetError), attempt(backend, FakeClock()):
        raise ConnectionResetError
    assert backend.in_flight == 0
    assert backend.failures_total == 1
    assert backend.responses_by_class[0] == 1


def test_context_manager_after_an_explicit_finish_releases_nothing_more() -> None:
    """finish() inside the block and the exit together give the slot back once."""
    backend = make_backend()
    with attempt(backend, FakeClock()) as guard:
        guard.finish()
    assert backend.in_flight == 0


async def test_cancelled_attempt_is_released_as_abandoned() -> None:
    """A task cancelled inside the guard gives the slot back without blaming the backend."""
    backend = make_backend()
    backend.consecutive_failures = 2
    started = asyncio.Event()

    async def run() -> None:
        with attempt(backend, FakeClock()):
            started.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(run())
    await asyncio.wait_for(started.wait(), 5.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert backend.in_flight == 0
    assert backend.failures_total == 0
    assert backend.consecutive_failures == 2


# -- outcomes ---------------------------------------------------------------------------------


def test_success_resets_the_consecutive_failure_count() -> None:
    """A 200 response clears the backend's run of failures."""
    backend = make_backend()
    backend.consecutive_failures = 4
    guard = attempt(backend, FakeClock())
    guard.response_started(200)
    guard.finish()
    assert backend.consecutive_failures == 0


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429])
def test_failure_status_counts_as_a_failure(status: int) -> None:
    """A 5xx or 429 response counts as a failure even when finish is called plainly."""
    backend = make_backend()
    guard = attempt(backend, FakeClock())
    guard.response_started(status)
    guard.finish()
    assert backend.failures_total == 1
    assert backend.consecutive_failures == 1
    assert backend.responses_by_class[5 if status >= 500 else 4] == 1


@pytest.mark.parametrize("status", [200, 204, 301, 400, 404, 499])
def test_other_statuses_are_no_failure(status: int) -> None:
    """Statuses below 500 other than 429 are the client's business, not a backend failure."""
    assert not is_failure_status(status)


def test_fast_503_pushes_the_latency_estimate_up() -> None:
    """A 503 that arrives in a millisecond makes the backend look slow, not fast."""
    clock = FakeClock()
    backend = make_backend()
    before = backend.rtt_at(clock(), DECAY_S)
    guard = attempt(backend, clock)
    clock.advance(0.001)
    guard.response_started(503)
    guard.finish()
    after = backend.rtt_at(clock(), DECAY_S)
    assert after >= max(2 * before, FAILURE_FLOOR_S)


def test_each_failure_at_least_doubles_the_estimate() -> None:
    """Repeated fast failures keep doubling the estimate, up to the cap."""
    clock = FakeClock()
    backend = make_backend()
    estimates = []
    for _ in range(12):
        guard = attempt(backend, clock)
        clock.advance(0.001)
        guard.finish(failed=True)
        estimates.append(backend.rtt_estimate_s)
    for previous, current in itertools.pairwise(estimates):
        assert current >= min(2 * previous, MAX_RTT_S) * 0.999
    assert estimates[-1] == MAX_RTT_S


def test_failed_attempt_without_headers_counts_as_no_response() -> None:
    """An attempt that failed before any response is counted under "no response"."""
    backend = make_backend()
    attempt(backend, FakeClock()).finish(failed=True)
    assert backend.responses_by_class == [1, 0, 0, 0, 0, 0]
    assert backend.failures_total == 1


def test_abandoned_attempt_counts_neither_failure_nor_success() -> None:
    """An attempt abandoned by the client leaves the failure counts and latency untouched."""
    clock = FakeClock()
    backend = make_backend()
    backend.consecutive_failures = 3
    before = backend.rtt_estimate_s
    guard = attempt(backend, clock)
    clock.advance(5.0)
    guard.finish(abandoned=True)
    assert backend.in_flight == 0
    assert backend.failures_total == 0
    assert backend.consecutive_failures == 3
    assert backend.rtt_estimate_s == before


def test_an_attempt_the_client_left_before_any_answer_is_no_response_of_the_backend() -> None:
    """Class ``none`` of a backend's responses means it gave no answer (refused, reset, timed
    out): a client that left first is not counted there, nor in its latency histogram, so the
    dashboard's error rate does not blame the backend for hang-ups."""
    backend = make_backend()
    guard = attempt(backend, FakeClock())
    guard.finish(abandoned=True)
    assert backend.responses_by_class == [0, 0, 0, 0, 0, 0]
    assert sum(backend.latency.counts) == 0
    failed = attempt(backend, FakeClock())
    failed.finish(failed=True)
    assert backend.responses_by_class == [1, 0, 0, 0, 0, 0]


def test_abandoned_after_a_good_status_does_not_reset_the_failure_run() -> None:
    """A client leaving mid-body after a 200 neither counts a failure nor clears the run."""
    backend = make_backend()
    backend.consecutive_failures = 3
    guard = attempt(backend, FakeClock())
    guard.response_started(200)
    guard.finish(abandoned=True, failed=True)
    assert backend.failures_total == 0
    assert backend.consecutive_failures == 3


# -- peak EWMA --------------------------------------------------------------------------------


def test_a_new_backend_starts_at_the_default_estimate() -> None:
    """A backend that never answered is estimated at the default guess."""
    assert make_backend().rtt_at(0.0, DECAY_S) == DEFAULT_RTT_S


def test_time_to_headers_is_the_latency_sample() -> None:
    """The time between creating the attempt and its headers is recorded as the latency."""
    clock = FakeClock()
    backend = make_backend()
    guard = attempt(backend, clock)
    clock.advance(0.4)
    guard.response_started(200)
    guard.finish()
    assert backend.rtt_estimate_s == pytest.approx(0.4)
    assert backend.rtt_stamp_s == clock()


def test_a_sample_above_the_estimate_replaces_it_at_once() -> None:
    """A latency peak is taken in full, however recently the estimate was updated."""
    backend = make_backend()
    record_rtt(backend, 0.1, now_s=100.0, decay_s=DECAY_S)
    record_rtt(backend, 2.5, now_s=100.0, decay_s=DECAY_S)
    assert backend.rtt_estimate_s == 2.5


def test_a_sample_below_the_estimate_moves_it_only_part_of_the_way() -> None:
    """A lower sample pulls the estimate down, but not all the way to the sample."""
    backend = make_backend()
    record_rtt(backend, 1.0, now_s=100.0, decay_s=DECAY_S)
    record_rtt(backend, 0.1, now_s=101.0, decay_s=DECAY_S)
    assert 0.1 < backend.rtt_estimate_s < 1.0


def test_a_sample_below_the_estimate_at_the_same_instant_changes_nothing() -> None:
    """With no time elapsed since the last update a lower sample carries no weight."""
    backend = make_backend()
    record_rtt(backend, 1.0, now_s=100.0, decay_s=DECAY_S)
    record_rtt(backend, 0.1, now_s=100.0, decay_s=DECAY_S)
    assert backend.rtt_estimate_s == 1.0


def test_a_lower_sample_weighs_more_the_longer_since_the_last_update() -> None:
    """The same low sample pulls the estimate further down after a longer quiet spell."""
    soon, late = make_backend(), make_backend()
    for backend, gap_s in ((soon, 1.0), (late, 8.0)):
        record_rtt(backend, 1.0, now_s=100.0, decay_s=DECAY_S)
        record_rtt(backend, 0.1, now_s=100.0 + gap_s, decay_s=DECAY_S)
    assert late.rtt_estimate_s < soon.rtt_estimate_s


def test_a_lower_sample_is_blended_in_with_weight_one_minus_exp_of_elapsed_over_decay() -> None:
    """The sample's weight in the blend with the current estimate is 1 - exp(-elapsed/decay)."""
    backend = make_backend()
    record_rtt(backend, 1.0, now_s=100.0, decay_s=DECAY_S)
    current = backend.rtt_at(105.0, DECAY_S)
    weight = 1.0 - math.exp(-5.0 / DECAY_S)
    record_rtt(backend, 0.1, now_s=105.0, decay_s=DECAY_S)
    assert backend.rtt_estimate_s == pytest.approx(current * (1 - weight) + 0.1 * weight)


def test_an_estimate_left_alone_relaxes_towards_the_default() -> None:
    """With no traffic, a high estimate decays back towards the default guess."""
    backend = make_backend()
    record_rtt(backend, 5.0, now_s=100.0, decay_s=DECAY_S)
    later = [backend.rtt_at(100.0 + t, DECAY_S) for t in (0.0, 10.0, 50.0, 500.0)]
    assert later == sorted(later, reverse=True)
    assert later[0] == 5.0
    assert later[-1] == pytest.approx(DEFAULT_RTT_S)


def test_estimate_is_capped() -> None:
    """No sample drives the estimate above MAX_RTT_S."""
    backend = make_backend()
    record_rtt(backend, 10 * MAX_RTT_S, now_s=100.0, decay_s=DECAY_S)
    assert backend.rtt_estimate_s == MAX_RTT_S


def estimated_at(backend: Backend, clock: FakeClock, estimate_s: float) -> None:
    """Give ``backend`` a fresh latency estimate of ``estimate_s``."""
    backend.rtt_estimate_s = estimate_s
    backend.rtt_stamp_s = clock()


def test_a_streams_latency_sample_is_its_time_to_first_token() -> None:
    """A token stream's headers come at once; its latency is taken at the first token."""
    clock, backend = FakeClock(), make_backend()
    estimated_at(backend, clock, 0.01)
    a = attempt(backend, clock)
    clock.advance(0.002)
    a.response_started(200, deferred=True)
    assert backend.rtt_estimate_s == pytest.approx(0.01)  # nothing taken at the headers
    clock.advance(0.498)
    a.first_token()
    assert backend.rtt_estimate_s == pytest.approx(0.5)  # the peak is taken at once
    clock.advance(2.0)
    a.first_token()  # only the first counts
    a.finish()
    assert backend.rtt_estimate_s == pytest.approx(0.5)


def test_a_stream_that_ends_without_a_token_is_sampled_at_its_end() -> None:
    clock, backend = FakeClock(), make_backend()
    estimated_at(backend, clock, 0.01)
    a = attempt(backend, clock)
    a.response_started(200, deferred=True)
    clock.advance(0.3)
    a.finish()
    assert backend.rtt_estimate_s == pytest.approx(0.3)


def test_a_stream_the_client_abandons_before_its_first_token_is_not_sampled() -> None:
    clock, backend = FakeClock(), make_backend()
    estimated_at(backend, clock, 0.01)
    a = attempt(backend, clock)
    a.response_started(200, deferred=True)
    clock.advance(5.0)
    a.finish(abandoned=True)
    a.first_token()  # too late: the attempt is over
    assert backend.rtt_estimate_s == pytest.approx(0.01)
