"""Queue timeouts: a job still queued at its deadline fails with DEADLINE_EXCEEDED, on time.

A timer, not the dispatcher, finds such jobs, so they expire even while every worker is busy.
Every replica runs it; taking a job out of its queue is atomic, so each job expires once.
"""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError

from libs.jobs import JobError, State
from services.scheduler.queues import Queues
from services.scheduler.store import JobStore

log = logging.getLogger(__name__)

BATCH = 100


class QueueExpiry:
    def __init__(self, queues: Queues, store: JobStore, interval_s: float) -> None:
        self._queues = queues
        self._store = store
        self._interval_s = interval_s

    async def expire_due(self) -> int:
        expired = await self._queues.expire_due(BATCH)
        for tenant, job_id in expired:
            record = await self._store.get(tenant, job_id)
            error = JobError(
                "DEADLINE_EXCEEDED",
                f"no worker took it within its queue timeout of {record.queue_timeout_ms / 1000:g} s",
                "QUEUE_TIMEOUT",
                {"queue_timeout_ms": str(record.queue_timeout_ms)},
            )
            await self._store.end_queued(tenant, job_id, State.FAILED, error)
        return len(expired)

    async def run_forever(self) -> None:
        while True:
            try:
                if await self.expire_due() == BATCH:
                    continue  # more are due
            except RedisError as exc:
                log.warning("queue expiry skipped a round: %s", exc)
            await asyncio.sleep(self._interval_s)
