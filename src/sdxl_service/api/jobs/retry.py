"""What becomes of a job whose run ended without images: one policy, decided on the outcome.

The render service's outcome (contract/render_request.py `OutcomeStatus`), not
the HTTP error made of it, says which of three it is:

- "not now" (`queue_full`, `loading`): the render service cannot take the
  images yet. The job goes back to the queue, its attempt not counted, and
  waits for the outcome's Retry-After (1 s without one).
- "run it again" (`worker_restarted`: the render worker died under the
  images): back to the queue, the attempt counted, after a backoff of BACKOFF_S
  doubling per attempt up to BACKOFF_MAX_S; failed once SDXL_JOB_ATTEMPTS runs
  have been made. A run that stopped with its whole service (found at the next
  start, or when its lease ran out on a shared database) is counted the same
  way but queued again at once: the service that finds it has just started,
  or is another replica, and the render service's own "not now" paces it.
- anything else (a timeout, out of memory, a bad LoRA, an error): the job
  fails with the error the synchronous call would have answered.

The time of the next attempt is stored with the job (`not_before`), so a
restart keeps the wait, and another replica honours it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ...contract.render_request import OutcomeStatus

# Outcomes that say "not now" rather than "not this job".
NOT_NOW = frozenset({OutcomeStatus.QUEUE_FULL, OutcomeStatus.LOADING})
# Outcomes after which the same job may well succeed on a second run.
RUN_AGAIN = frozenset({OutcomeStatus.WORKER_RESTARTED})
# Without a Retry-After of the outcome's: wait this long for a "not now".
NOT_NOW_S = 1.0
# The wait before the second run; doubled for each run after it, up to the maximum.
BACKOFF_S = 1.0
BACKOFF_MAX_S = 60.0


class Verdict(StrEnum):
    FAIL = "fail"  # the job ends failed
    RETRY = "retry"  # back to the queue, the attempt counted
    LATER = "later"  # back to the queue, the attempt not counted


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    # How long the job waits in the queue before its next run.
    delay_s: float = 0.0

    @property
    def requeue(self) -> bool:
        return self.verdict is not Verdict.FAIL

    @property
    def count_attempt(self) -> bool:
        return self.verdict is not Verdict.LATER


FAIL = Decision(Verdict.FAIL)


@dataclass(frozen=True)
class RetryPolicy:
    """`max_attempts`: SDXL_JOB_ATTEMPTS, the runs a job gets before it fails."""

    max_attempts: int
    backoff_s: float = BACKOFF_S
    backoff_max_s: float = BACKOFF_MAX_S

    def backoff(self, attempts: int) -> float:
        """The wait before the run after `attempts` counted runs (1: the second run)."""
        return min(self.backoff_max_s, self.backoff_s * float(2 ** max(0, attempts - 1)))

    def after_outcome(
        self, status: OutcomeStatus | None, attempts: int, retry_after: float | None = None
    ) -> Decision:
        """A run ended with the render outcome `status` (None: not an outcome, say a
        request that no longer validates), after `attempts` counted runs, this one
        included."""
        if status in NOT_NOW:
            return Decision(Verdict.LATER, NOT_NOW_S if retry_after is None else retry_after)
        if status in RUN_AGAIN and attempts < self.max_attempts:
            return Decision(Verdict.RETRY, self.backoff(attempts))
        return FAIL

    def after_service_stopped(self, attempts: int) -> Decision:
        """A run whose service stopped under it (no outcome at all), after `attempts`
        counted runs, this one included."""
        return FAIL if attempts >= self.max_attempts else Decision(Verdict.RETRY)
