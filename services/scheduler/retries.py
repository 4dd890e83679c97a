"""What happens after a worker fails a job: another attempt (along which route, after how long), or
the end.

Limits are counted per failure reason (the worker's `ErrorInfo.reason`), plus a cap on hand-overs of
any kind, so a job that keeps killing its worker ends FAILED instead of looping. Out-of-memory
retries fall back in two steps: memory savers on the same model, then a worker with more free VRAM.
An invalid output is retried once in full precision.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from libs.jobs import JobError, JobRecord, Route

OUT_OF_MEMORY = "OUT_OF_MEMORY"
INVALID_OUTPUT = "INVALID_OUTPUT"
WORKER_CRASHED = "WORKER_CRASHED"

# Attempts a job gets per failure reason; a reason not listed is not retried.
DEFAULT_MAX_ATTEMPTS = {
    WORKER_CRASHED: 3,
    OUT_OF_MEMORY: 3,
    INVALID_OUTPUT: 2,
    "MODEL_LOAD_FAILED": 3,
    "DEADLINE_EXCEEDED": 1,
    "RESULT_CORRUPTED": 2,  # bytes that did not match their SHA-256 on the way to the scheduler
}


@dataclass(frozen=True)
class Decision:
    retry: bool
    route: Route
    delay_ms: int
    min_vram_bytes: int
    failures: dict[str, int]
    # What the job ends with when it is not retried.
    error: JobError


class RetryPolicy:
    def __init__(
        self,
        max_attempts: dict[str, int],
        *,
        max_total_attempts: int,
        backoff_base_ms: int,
        backoff_max_ms: int,
        rng: random.Random | None = None,
    ) -> None:
        self._max = {**DEFAULT_MAX_ATTEMPTS, **max_attempts}
        self._max_total = max_total_attempts
        self._base_ms = backoff_base_ms
        self._cap_ms = backoff_max_ms
        self._rng = rng or random.Random()

    def decide(self, record: JobRecord, error: JobError, *, most_free_vram: int) -> Decision:
        """`most_free_vram`: the most free VRAM any live worker serving the model reports."""
        failures = {**record.failures, error.reason: record.failures.get(error.reason, 0) + 1}
        count = failures[error.reason]
        route, min_vram = record.route, record.min_vram_bytes
        retry = count < self._max.get(error.reason, 1) and record.attempt < self._max_total
        if retry and error.reason == OUT_OF_MEMORY:
            if count == 1:
                route, min_vram = Route.MEMORY_SAVERS, 0
            else:
                had = int(error.metadata.get("vram_free_bytes", "0") or 0)
                route, min_vram = Route.LARGER_GPU, had + 1
                if most_free_vram < min_vram:
                    retry = False
                    error = dataclasses.replace(
                        error,
                        message=f"{error.message}; no worker has more than the {had} bytes of free GPU "
                        "memory this attempt had",
                    )
        elif retry and error.reason == INVALID_OUTPUT:
            route = Route.FULL_PRECISION
        return Decision(retry, route, self.backoff_ms(sum(failures.values())), min_vram, failures, error)

    def backoff_ms(self, failures: int) -> int:
        """Exponential in the failures so far, capped, with jitter so retries of many jobs that failed
        together (a worker died) do not land together."""
        ceiling = min(self._cap_ms, self._base_ms * 2 ** max(0, failures - 1))
        return int(ceiling * self._rng.uniform(0.5, 1.0))

    def exhausted(self, record: JobRecord) -> bool:
        """Whether the job has used up its hand-overs of any kind."""
        return record.attempt >= self._max_total
