"""Tests for lb.retry: retry conditions, full-jitter backoff, the retry budget and Retry-After."""

from __future__ import annotations

import random
import statistics
from email.utils import formatdate

import pytest

from lb.config_resilience import Retry
from lb.errors import (
    NoBackendAvailable,
    ProxyError,
    Rejected,
    UpstreamFailed,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from lb.retry import RetryBudget, RetryPolicy, parse_retry_after, retry_reason

# A fixed wall-clock instant for Retry-After dates: 2023-11-14 22:13:20 UTC.
EPOCH_S = 1_700_000_000.0


def budget_with(requests: int, retries: int) -> RetryBudget:
    budget = RetryBudget()
    budget.requests = requests
    budget.retries = retries
    return budget


def retries_allowed(policy: RetryPolicy, requests: int) -> int:
    """How many retries may start one after another with ``requests`` requests in flight."""
    budget = budget_with(requests, 0)
    for _ in range(requests + policy.budget_min + 10):
        if not budget.allows(policy):
            break
        budget.retries += 1
    return budget.retries


# -- from_config ------------------------------------------------------------------------------


def test_from_config_splits_retry_on_into_conditions_and_statuses() -> None:
    """Names in retry_on become conditions and numbers become retried statuses."""
    policy = RetryPolicy.from_config(Retry(retry_on=["timeout", "reset", 503, 429]))
    assert policy.conditions == frozenset({"timeout", "reset"})
    assert policy.statuses == frozenset({503, 429})


def test_from_config_with_only_statuses_retries_no_failure_kind() -> None:
    """A retry_on list of statuses alone leaves the set of retried failure kinds empty."""
    policy = RetryPolicy.from_config(Retry(retry_on=[502]))
    assert policy.conditions == frozenset()
    assert policy.statuses == frozenset({502})


def test_from_config_copies_limits_and_turns_budget_percent_into_a_ratio() -> None:
    """The numeric settings are carried over and budget_percent 25 becomes a ratio of 0.25."""
    policy = RetryPolicy.from_config(
        Retry(
            max_retries=4,
            per_try_timeout_s=1.5,
            deadline_s=9.0,
            backoff_base_s=0.01,
            backoff_max_s=0.3,
            retry_after_max_s=12.0,
            budget_percent=25.0,
            budget_min_concurrent=7,
            replay_max_bytes=4096,
        )
    )
    assert policy == RetryPolicy(
        max_retries=4,
        conditions=policy.conditions,
        statuses=policy.statuses,
        per_try_timeout_s=1.5,
        deadline_s=9.0,
        backoff_base_s=0.01,
        backoff_max_s=0.3,
        retry_after_max_s=12.0,
        budget_percent=25.0,
        budget_min=7,
        replay_max_bytes=4096,
    )


def test_a_per_try_timeout_with_the_default_conditions_retries_its_expiry() -> None:
    policy = RetryPolicy.from_config(Retry(per_try_timeout_s=2.0))
    assert policy.retries_error(UpstreamTimeout("no headers within 2s"))
    assert policy.conditions == frozenset({"connect_error", "reset", "timeout"})


def test_a_per_try_timeout_with_conditions_written_out_keeps_them_as_written() -> None:
    policy = RetryPolicy.from_config(Retry(per_try_timeout_s=2.0, retry_on=["reset", 503]))
    assert not policy.retries_error(UpstreamTimeout("no headers within 2s"))


def test_default_config_gives_the_default_policy() -> None:
    """A Retry section left at its defaults maps to the policy's own defaults."""
    assert RetryPolicy.from_config(Retry()) == RetryPolicy()


# -- retries_error ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "condition"),
    [
        (UpstreamUnreachable("refused"), "connect_error"),
        (UpstreamFailed("reset"), "reset"),
        (UpstreamTimeout("slow"), "timeout"),
    ],
    ids=["unreachable", "failed", "timeout"],
)
def test_error_retries_when_its_condition_is_listed(error: ProxyError, condition: str) -> None:
    """An upstream error retries when the policy lists the condition it falls under."""
    assert RetryPolicy(conditions=frozenset({condition})).retries_error(error)


@pytest.mark.parametrize(
    ("error", "condition"),
    [
        (UpstreamUnreachable("refused"), "connect_error"),
        (UpstreamFailed("reset"), "reset"),
        (UpstreamTimeout("slow"), "timeout"),
    ],
    ids=["unreachable", "failed", "timeout"],
)
def test_error_does_not_retry_when_only_other_conditions_are_listed(
    error: ProxyError, condition: str
) -> None:
    """An upstream error does not retry when the policy lists every condition but its own."""
    others = frozenset({"connect_error", "reset", "timeout"}) - {condition}
    assert not RetryPolicy(conditions=others).retries_error(error)


def test_timeouts_are_not_retried_by_default() -> None:
    """The default policy retries connect errors and resets but not timeouts."""
    policy = RetryPolicy()
    assert policy.retries_error(UpstreamUnreachable("refused"))
    assert policy.retries_error(UpstreamFailed("reset"))
    assert not policy.retries_error(UpstreamTimeout("slow"))


def test_errors_that_are_no_upstream_failure_never_retry() -> None:
    """Errors other than the three upstream failure kinds never retry, whatever the policy."""
    policy = RetryPolicy(conditions=frozenset({"connect_error", "reset", "timeout"}))
    assert not policy.retries_error(NoBackendAvailable("none"))
    assert not policy.retries_error(UpstreamStatus("503", status=503, retry_after_s=None))


# -- backoff_s --------------------------------------------------------------------------------


@pytest.mark.parametrize("retry_number", [1, 2, 3, 4, 5, 6, 8])
def test_backoff_stays_within_zero_and_the_capped_exponential_ceiling(retry_number: int) -> None:
    """Every backoff draw lies in [0, min(max, base * 2^(n-1))]."""
    policy = RetryPolicy(backoff_base_s=0.025, backoff_max_s=0.5)
    ceiling = min(0.5, 0.025 * 2 ** (retry_number - 1))
    rng = random.Random(retry_number)
    draws = [policy.backoff_s(retry_number, rng) for _ in range(2000)]
    assert all(0.0 <= d <= ceiling for d in draws)
    # Full jitter: the draws spread over the whole range, not a corner of it.
    assert min(draws) < 0.05 * ceiling
    assert max(draws) > 0.95 * ceiling


def test_mean_backoff_doubles_with_each_retry_until_the_cap() -> None:
    """The mean backoff roughly doubles from one retry to the next while under the cap."""
    policy = RetryPolicy(backoff_base_s=0.025, backoff_max_s=0.5)
    rng = random.Random(7)
    means = [statistics.fmean(policy.backoff_s(n, rng) for _ in range(4000)) for n in range(1, 6)]
    for n, mean in enumerate(means, start=1):
        assert mean == pytest.approx(0.025 * 2 ** (n - 1) / 2, rel=0.08)
    assert means == sorted(means)


def test_mean_backoff_stops_growing_once_capped() -> None:
    """Past the cap the mean backoff stays at half the cap, however many retries came before."""
    policy = RetryPolicy(backoff_base_s=0.025, backoff_max_s=0.5)
    rng = random.Random(11)
    for n in (6, 7, 10, 20):
        mean = statistics.fmean(policy.backoff_s(n, rng) for _ in range(4000))
        assert mean == pytest.approx(0.25, rel=0.08)


def test_backoff_is_zero_when_the_base_is_zero() -> None:
    """A zero backoff base gives no backoff at all."""
    policy = RetryPolicy(backoff_base_s=0.0)
    rng = random.Random(1)
    assert [policy.backoff_s(n, rng) for n in range(1, 5)] == [0.0] * 4


def test_backoff_is_reproducible_with_a_seeded_rng() -> None:
    """The same seed gives the same sequence of backoffs."""
    policy = RetryPolicy()
    first = [policy.backoff_s(n, random.Random(3)) for n in range(1, 6)]
    second = [policy.backoff_s(n, random.Random(3)) for n in range(1, 6)]
    assert first == second


# -- RetryBudget ------------------------------------------------------------------------------


def test_budget_of_twenty_percent_allows_twenty_retries_among_a_hundred_requests() -> None:
    """With 100 requests in flight and a 20% budget, retries 1 to 20 may start but not the 21st."""
    policy = RetryPolicy(budget_percent=20.0, budget_min=3)
    assert budget_with(100, 19).allows(policy)
    assert not budget_with(100, 20).allows(policy)


def test_budget_counts_twenty_retries_started_one_after_another() -> None:
    """Starting retries one by one under a 20% budget of 100 requests stops at exactly 20."""
    assert retries_allowed(RetryPolicy(budget_percent=20.0, budget_min=3), 100) == 20


def test_budget_minimum_applies_when_the_ratio_allows_fewer() -> None:
    """With few requests in flight the budget still allows budget_min retries, and no more."""
    policy = RetryPolicy(budget_percent=20.0, budget_min=3)
    assert budget_with(5, 2).allows(policy)
    assert not budget_with(5, 3).allows(policy)


def test_budget_with_nothing_in_flight_allows_the_minimum() -> None:
    """An idle pool allows exactly budget_min retries."""
    assert retries_allowed(RetryPolicy(budget_percent=20.0, budget_min=3), 0) == 3


def test_budget_of_zero_allows_no_retry() -> None:
    """A zero ratio and a zero minimum allow no retry at all."""
    assert not budget_with(1000, 0).allows(RetryPolicy(budget_percent=0.0, budget_min=0))


def test_budget_percent_from_config_allows_exactly_that_share() -> None:
    """A configured 7% budget with 100 requests in flight allows exactly 7 retries."""
    policy = RetryPolicy.from_config(Retry(budget_percent=7.0, budget_min_concurrent=0))
    assert retries_allowed(policy, 100) == 7


# -- parse_retry_after ------------------------------------------------------------------------


def test_retry_after_delay_seconds_is_returned_as_is() -> None:
    """A delay-seconds value is that many seconds, whatever the time now."""
    assert parse_retry_after(b"120", EPOCH_S) == 120.0


def test_retry_after_surrounding_whitespace_is_ignored() -> None:
    """Whitespace around a delay-seconds value does not stop it being read."""
    assert parse_retry_after(b" 5 ", EPOCH_S) == 5.0


def test_retry_after_http_date_is_the_seconds_until_that_date() -> None:
    """An HTTP date 90 seconds after now means waiting 90 seconds."""
    value = formatdate(EPOCH_S + 90, usegmt=True).encode()
    assert parse_retry_after(value, EPOCH_S) == pytest.approx(90.0)


def test_retry_after_date_in_the_past_means_no_wait() -> None:
    """An HTTP date already past means waiting zero seconds, never a negative time."""
    value = formatdate(EPOCH_S - 3600, usegmt=True).encode()
    assert parse_retry_after(value, EPOCH_S) == 0.0


@pytest.mark.parametrize(
    "value",
    [b"soon", b"", b"-5", b"1.5", b"Tuesday at noon", b"\xff\xfe"],
    ids=["word", "empty", "negative", "fraction", "prose", "binary"],
)
def test_retry_after_garbage_is_none(value: bytes) -> None:
    """A value that is neither delay-seconds nor an HTTP date gives None."""
    assert parse_retry_after(value, EPOCH_S) is None


def test_retry_after_of_non_ascii_digit_characters_is_none() -> None:
    """Latin-1 superscript digits (which str.isdigit accepts) give None rather than an error."""
    assert parse_retry_after(b"\xb2", EPOCH_S) is None


# -- retry_reason -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "label"),
    [
        (UpstreamUnreachable("refused"), "connect_error"),
        (UpstreamFailed("reset"), "reset"),
        (UpstreamTimeout("slow"), "timeout"),
        (UpstreamStatus("busy", status=503, retry_after_s=None), "503"),
        (UpstreamStatus("busy", status=429, retry_after_s=2.0), "429"),
        (NoBackendAvailable("none"), "other"),
        (Rejected("full", status=503, retry_after_s=1), "other"),
    ],
    ids=["unreachable", "failed", "timeout", "503", "429", "no-backend", "rejected"],
)
def test_retry_reason_labels_each_error(error: ProxyError, label: str) -> None:
    """A retry is counted under the failure kind, the retried status, or "other"."""
    assert retry_reason(error) == label
