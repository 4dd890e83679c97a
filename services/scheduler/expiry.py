"""Queue timeouts: a job still queued at its deadline fails with DEADLINE_EXCEEDED, on time.

A timer, not the dispatcher, finds such jobs, so they expire even while every worker is busy.
Every replica runs it; taking a job out of its queue is atomic, so each job expires once. The
take-out leaves an `expire` intent, so a replica dying before the job is marked still fails it.
"""

from __future__ import annotations

from libs.errors import NotFound
from libs.jobs import JobError, State
from services.scheduler.queues import Queues, intent_member
from services.scheduler.store import JobStore

BATCH = 100
INTENT = "expire"


class QueueExpiry:
    def __init__(self, queues: Queues, store: JobStore, *, grace_ms: int) -> None:
        self._queues = queues
        self._store = store
        self._grace_ms = grace_ms

    async def expire_due(self) -> int:
        expired = await self._queues.expire_due(BATCH, self._grace_ms)
        for tenant, job_id in expired:
            await self.end(tenant, job_id)
            await self._queues.done(intent_member(INTENT, tenant, job_id))
        return len(expired)

    async def end(self, tenant: str, job_id: str) -> None:
        try:
            record = await self._store.get(tenant, job_id)
        except NotFound:
            return
        error = JobError(
            "DEADLINE_EXCEEDED",
            f"no worker took it within its queue timeout of {record.queue_timeout_ms / 1000:g} s",
            "QUEUE_TIMEOUT",
            {"queue_timeout_ms": str(record.queue_timeout_ms)},
        )
        await self._store.end_queued(tenant, job_id, State.FAILED, error)
