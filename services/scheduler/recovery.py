"""Settling an attempt that did not succeed: retry it, hand it back, or end the job.

Each path is two steps in two hash slots: the job's state first (fenced by the attempt), then its
lease and place in line in one dispatch step. The lease is only dropped by that second step, so if a
scheduler dies in between, the lease expires and the reaper (`reaper.py`) finishes the move from
the job's state.
"""

from __future__ import annotations

import logging

from libs.jobs import JobError, JobRecord, Route
from services.scheduler.queues import Queues, queued
from services.scheduler.registry import Registry
from services.scheduler.retries import WORKER_CRASHED, RetryPolicy
from services.scheduler.store import JobStore, Outcome

log = logging.getLogger(__name__)


class Recovery:
    def __init__(self, store: JobStore, queues: Queues, policy: RetryPolicy, registry: Registry) -> None:
        self._store = store
        self._queues = queues
        self._policy = policy
        self._registry = registry

    async def _cancel_instead(self, record: JobRecord, attempt: int) -> bool:
        """The client asked to stop the job: whatever ended this attempt, it ends CANCELLED rather
        than going back in line."""
        if not record.cancel_requested:
            return False
        outcome = await self._store.cancelled(record.tenant, record.id, attempt, record.step)
        if outcome.ok:
            await self._queues.release(record.tenant, record.id, attempt, finished=True)
        return True

    async def failed(self, record: JobRecord, attempt: int, error: JobError) -> None:
        """The worker reported (or the scheduler found) that `attempt` failed with `error`."""
        if await self._cancel_instead(record, attempt):
            return
        decision = self._policy.decide(
            record, error, most_free_vram=await self._registry.most_free_vram(record.model)
        )
        log.info(
            "jobs/%s attempt %d failed with %s: %s",
            record.id,
            attempt,
            error.reason,
            f"retry via {decision.route.value} in {decision.delay_ms} ms" if decision.retry else "giving up",
        )
        if not decision.retry:
            await self.give_up(record, attempt, decision.error)
            return
        await self._requeue(
            record,
            attempt,
            error,
            route=decision.route,
            failures=decision.failures,
            min_vram_bytes=decision.min_vram_bytes,
            delay_ms=decision.delay_ms,
        )

    async def give_up(self, record: JobRecord, attempt: int, error: JobError) -> None:
        """Ends the job FAILED with `error` and puts it on the dead-letter list."""
        outcome = await self._store.fail(record.tenant, record.id, attempt, error, dead_letter=True)
        if outcome.ok:
            await self._queues.bury(record.tenant, record.id, attempt)
        else:
            await self._settled_elsewhere(record, attempt, outcome)

    async def lost(self, record: JobRecord, attempt: int, worker: str, *, started: bool) -> None:
        """The worker holding `attempt` went away. A job it had started counts a crash against the
        job (it may be what killed the worker); one still waiting for a slot goes back for free."""
        if started:
            error = JobError(
                "UNAVAILABLE",
                f"worker {worker} was lost while running the job",
                WORKER_CRASHED,
                {"worker": worker, "detected_by": "scheduler"},
            )
            await self.failed(record, attempt, error)
        else:
            await self.release(record, attempt)

    async def release(self, record: JobRecord, attempt: int) -> None:
        """Hands `attempt` back unfinished (the worker drained, a scheduler stopped): another worker
        runs it along the same route, with no failure counted, up to the cap on hand-overs."""
        if await self._cancel_instead(record, attempt):
            return
        if self._policy.exhausted(record):
            last = next((a.error for a in reversed(record.attempts) if a.error is not None), None)
            error = last or JobError(
                "UNAVAILABLE", f"handed to a worker {record.attempt} times without finishing", WORKER_CRASHED
            )
            await self.give_up(record, attempt, error)
            return
        await self._requeue(
            record,
            attempt,
            None,
            route=record.route,
            failures=record.failures,
            min_vram_bytes=record.min_vram_bytes,
            delay_ms=0,
        )

    async def _requeue(
        self,
        record: JobRecord,
        attempt: int,
        error: JobError | None,
        *,
        route: Route,
        failures: dict[str, int],
        min_vram_bytes: int,
        delay_ms: int,
    ) -> None:
        """The job back to QUEUED for another attempt, then its lease traded for a place in line."""
        outcome = await self._store.retry(
            record.tenant,
            record.id,
            attempt,
            error,
            route=route,
            failures=failures,
            min_vram_bytes=min_vram_bytes,
        )
        if outcome.ok:
            await self._queues.retry(
                attempt, queued(record), delay_ms=delay_ms, min_vram_bytes=min_vram_bytes
            )
        else:
            await self._settled_elsewhere(record, attempt, outcome)

    async def _settled_elsewhere(self, record: JobRecord, attempt: int, outcome: Outcome) -> None:
        """The job moved on without us (it ended, or a newer attempt owns it)."""
        if outcome.gone:
            await self._queues.release(record.tenant, record.id, attempt, finished=True)
