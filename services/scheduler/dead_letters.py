"""The dead-letter list: jobs that ended FAILED after their retries, kept for an operator to look at
and requeue (`kiln dead-letters list|requeue`).

A requeue reopens the job (FAILED to QUEUED, failure counts reset, the same job id, so clients
watching it see it run again) and puts it back in line. Taking it off the list leaves an `enqueue`
intent, so a crash half-way puts it back in line or back on the list, never nowhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from libs.errors import FailedPrecondition, NotFound
from libs.jobs import JobRecord
from services.scheduler.queues import Queues, queued
from services.scheduler.store import JobStore


@dataclass(frozen=True)
class DeadLetter:
    record: JobRecord
    buried_ms: int


class DeadLetters:
    def __init__(self, store: JobStore, queues: Queues, *, grace_ms: int) -> None:
        self._store = store
        self._queues = queues
        self._grace_ms = grace_ms

    async def list(self, limit: int = 100) -> list[DeadLetter]:
        out = []
        for tenant, job_id, buried_ms in await self._queues.dead_letters(limit):
            try:
                out.append(DeadLetter(await self._store.get(tenant, job_id), buried_ms))
            except NotFound:  # the job expired (its TTL): nothing left to requeue
                await self._queues.forget_dead_letter(tenant, job_id)
        return out

    async def requeue(self, tenant: str, job_id: str) -> JobRecord:
        intent = await self._queues.unbury(tenant, job_id, self._grace_ms)
        if not intent:
            raise FailedPrecondition(
                f"jobs/{job_id} of tenant {tenant} is not on the dead-letter list", reason="NOT_DEAD_LETTER"
            )
        outcome = await self._store.reopen(tenant, job_id)
        record = await self._store.get(tenant, job_id)
        if outcome.ok:
            await self._queues.enqueue(queued(record), front=True, intent=intent)
        return record
