"""The retry policy of image jobs: decided on the render outcome, with backoff and "not now"."""

from __future__ import annotations

import pytest

from sdxl_service.api.errors import outcome_error
from sdxl_service.api.jobs.retry import BACKOFF_MAX_S, NOT_NOW_S, Decision, RetryPolicy, Verdict
from sdxl_service.contract.render_request import GenerationOutcome, OutcomeStatus

POLICY = RetryPolicy(max_attempts=3, backoff_s=2.0, backoff_max_s=5.0)


@pytest.mark.parametrize("status", [OutcomeStatus.QUEUE_FULL, OutcomeStatus.LOADING])
def test_not_now_waits_for_retry_after_and_never_counts_an_attempt(status: OutcomeStatus) -> None:
    # Not even past the attempts: a busy render service is no fault of the job.
    for attempts in (1, 3, 10):
        assert POLICY.after_outcome(status, attempts, retry_after=7) == Decision(Verdict.LATER, 7)
    decision = POLICY.after_outcome(status, 1)
    assert decision == Decision(Verdict.LATER, NOT_NOW_S)
    assert decision.requeue and not decision.count_attempt


def test_a_lost_render_worker_runs_again_with_a_doubling_backoff_then_fails() -> None:
    lost = OutcomeStatus.WORKER_RESTARTED
    assert POLICY.after_outcome(lost, 1) == Decision(Verdict.RETRY, 2.0)
    assert POLICY.after_outcome(lost, 2) == Decision(Verdict.RETRY, 4.0)
    assert POLICY.after_outcome(lost, 2).count_attempt
    failed = POLICY.after_outcome(lost, 3)
    assert failed.verdict is Verdict.FAIL and not failed.requeue
    # The backoff stops growing at its maximum.
    assert RetryPolicy(max_attempts=100, backoff_s=2.0, backoff_max_s=5.0).backoff(10) == 5.0
    assert RetryPolicy(max_attempts=100).backoff(50) == BACKOFF_MAX_S


@pytest.mark.parametrize(
    "status",
    [
        OutcomeStatus.TIMEOUT,
        OutcomeStatus.OUT_OF_MEMORY,
        OutcomeStatus.INVALID_LORA,
        OutcomeStatus.INVALID_MODEL,
        OutcomeStatus.ERROR,
        OutcomeStatus.CANCELLED,
        None,  # not a render outcome: the request itself was refused
    ],
)
def test_other_outcomes_fail_at_once(status: OutcomeStatus | None) -> None:
    assert POLICY.after_outcome(status, 1).verdict is Verdict.FAIL


def test_a_run_its_service_stopped_under_is_queued_again_at_once_until_the_attempts() -> None:
    assert POLICY.after_service_stopped(1) == Decision(Verdict.RETRY, 0.0)
    assert POLICY.after_service_stopped(2).count_attempt
    assert POLICY.after_service_stopped(3).verdict is Verdict.FAIL


@pytest.mark.parametrize("status", list(OutcomeStatus)[1:])
def test_the_error_of_an_outcome_carries_the_outcome_and_its_retry_after(
    status: OutcomeStatus,
) -> None:
    error = outcome_error(GenerationOutcome(status=status, message="m", retry_after=2.6))
    assert error.outcome is status
    # Carried beside the answer, never in it.
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}
    if "Retry-After" in error.headers:
        assert error.retry_after == float(error.headers["Retry-After"]) == 3
    else:
        assert error.retry_after is None
