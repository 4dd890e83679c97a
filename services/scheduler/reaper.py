"""Finishes what a lost worker or a dead scheduler left half-done, on every replica at once.

- Expired leases: heartbeats stopped (the worker died, or the scheduler it talked to did), so the job
  is retried elsewhere; a running job whose worker still heartbeats never expires.
- Open intents: a change across two hash slots whose second step never came (see `Queues.intend`).

Each item is put off by a grace period in the same step that hands it out, so one replica at a time
works on it, and each step it takes is fenced, so doing it twice changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from libs.errors import NotFound
from libs.jobs import JobRecord, State
from services.scheduler.queues import Queues, intent_member, queued
from services.scheduler.recovery import Recovery
from services.scheduler.store import JobStore

log = logging.getLogger(__name__)

BATCH = 100

# Finishes one kind of intent for a job that is still QUEUED; gets (tenant, job id).
IntentHandler = Callable[[str, str], Awaitable[None]]


class Reaper:
    def __init__(
        self,
        store: JobStore,
        queues: Queues,
        recovery: Recovery,
        *,
        grace_ms: int,
        handlers: dict[str, IntentHandler],
    ) -> None:
        self._store = store
        self._queues = queues
        self._recovery = recovery
        self._grace_ms = grace_ms
        self._handlers = handlers

    async def _record(self, tenant: str, job_id: str) -> JobRecord | None:
        try:
            return await self._store.get(tenant, job_id)
        except NotFound:
            return None

    async def reap_leases(self) -> int:
        expired = await self._queues.reap(BATCH, self._grace_ms)
        for tenant, job_id, worker, attempt in expired:
            record = await self._record(tenant, job_id)
            if record is None:
                await self._queues.release(tenant, job_id, attempt, finished=True)
            elif record.state is State.RUNNING and record.attempt == attempt:
                log.warning("jobs/%s: lease of attempt %d on %s expired", job_id, attempt, worker)
                await self._recovery.lost(record, attempt, worker, started=True)
            elif record.state is State.QUEUED:
                # Moved back to QUEUED (or never started) before its lease was handed back.
                await self._queues.retry(
                    attempt, queued(record), delay_ms=0, min_vram_bytes=record.min_vram_bytes
                )
            elif record.state.terminal and record.dead_letter:
                await self._queues.bury(tenant, job_id, attempt)
            else:
                await self._queues.release(tenant, job_id, attempt, finished=record.state.terminal)
        return len(expired)

    async def finish_intents(self) -> int:
        due = await self._queues.due_intents(BATCH, self._grace_ms)
        for kind, tenant, job_id in due:
            intent = intent_member(kind, tenant, job_id)
            record = await self._record(tenant, job_id)
            if record is None or record.state is not State.QUEUED:
                if record is not None and record.state is State.FAILED and record.dead_letter:
                    # Taken off the dead-letter list but never reopened: back on it.
                    await self._queues.bury(tenant, job_id, None)
                await self._queues.done(intent)
            elif kind == "enqueue":
                # Still open, so no one has put the job in line: the enqueue closes it.
                await self._queues.enqueue(queued(record), intent=intent)
            elif kind in self._handlers:
                await self._handlers[kind](tenant, job_id)
                await self._queues.done(intent)
            else:
                log.error("unknown intent %r", intent)
                await self._queues.done(intent)
        return len(due)
