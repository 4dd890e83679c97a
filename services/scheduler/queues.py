"""Dispatch state shared by every scheduler replica: fair queues, leases and attempts.

Capacity is shared across tiers by `dispatch_weight`, counted in compute units and work-conserving;
within a tier, tenants share by the compute units they were served; within a tenant, jobs run in
order (`lua/dispatch.lua`). Claiming the next job is one Lua step, so no two replicas hand out the
same job. The attempt counter is the fencing token every later message about the job must carry.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from libs import redis_keys as keys
from libs.jobs import JobRecord
from services.scheduler.scripts import Scripts


@dataclass(frozen=True)
class Claim:
    tenant: str
    job_id: str
    attempt: int
    lease_expire_ms: int


@dataclass(frozen=True)
class QueuedJob:
    """Where a job waits: its model's queue, its tier's share, its tenant's line."""

    tenant: str
    tier: str
    job_id: str
    model: str
    cost: int
    timeout_ms: int = 0  # 0: no queue deadline


def queued(record: JobRecord) -> QueuedJob:
    return QueuedJob(
        record.tenant, record.tier, record.id, record.model, record.cost, record.queue_timeout_ms
    )


class Queues:
    def __init__(self, redis: Redis, scripts: Scripts, weights: dict[str, int]) -> None:
        self._redis = redis
        self._scripts = scripts
        self._weights = [str(len(weights)), *(str(item) for pair in sorted(weights.items()) for item in pair)]
        self._rotation = itertools.count()

    async def _dispatch(self, op: str, *args: str | int) -> object:
        return await self._scripts.dispatch(
            keys=[keys.leases(), keys.lease_owners(), keys.attempts(), keys.queue_deadlines()],
            args=[op, keys.DISPATCH_PREFIX, *self._weights, *args],
        )

    async def enqueue(self, job: QueuedJob, *, front: bool = False) -> None:
        await self._dispatch(
            "enqueue",
            job.model,
            job.tier,
            job.tenant,
            job.job_id,
            job.cost,
            "1" if front else "0",
            job.timeout_ms,
        )
        await self._redis.publish(keys.WAKE_CHANNEL, job.model)

    async def remove(self, job: QueuedJob) -> bool:
        """Takes a job out of its queue; False when it was not there (claimed or expired)."""
        return bool(await self._dispatch("remove", job.model, job.tier, job.tenant, job.job_id, job.cost))

    async def expire_due(self, most: int) -> list[tuple[str, str]]:
        """Takes out the jobs whose queue timeout has passed; (tenant, job id) of each."""
        expired = await self._dispatch("expire", most)
        assert isinstance(expired, list)
        return [keys.parse_queue_entry(entry.decode()) for entry in expired]

    async def stats(self, model: str) -> tuple[int, float]:
        """(compute units queued for `model`, compute units per second served over about a minute)."""
        result = await self._dispatch("stats", model)
        assert isinstance(result, list)
        queued, rate = (v.decode() for v in result)
        return int(float(queued)), float(rate)

    async def claim(self, worker_id: str, models: Sequence[str], lease_ms: int) -> Claim | None:
        if not models:
            return None
        result = await self._dispatch(
            "claim",
            worker_id,
            lease_ms,
            next(self._rotation) % len(models),
            len(models),
            *models,
        )
        if not result:
            return None
        assert isinstance(result, list)
        entry, attempt, expires = result
        tenant, job_id = keys.parse_queue_entry(entry.decode())
        return Claim(tenant, job_id, int(attempt), int(expires))

    async def release(self, tenant: str, job_id: str, attempt: int, *, finished: bool) -> bool:
        return bool(
            await self._scripts.release(
                keys=[keys.leases(), keys.lease_owners(), keys.attempts()],
                args=[keys.queue_entry(tenant, job_id), attempt, "1" if finished else "0"],
            )
        )

    async def requeue(self, attempt: int, job: QueuedJob) -> bool:
        """Gives a leased job back: it goes to the head of its tenant's line, with no new deadline."""
        if not await self.release(job.tenant, job.job_id, attempt, finished=False):
            return False
        await self.enqueue(QueuedJob(job.tenant, job.tier, job.job_id, job.model, job.cost), front=True)
        return True

    async def renew(self, worker_id: str, held: Sequence[tuple[str, str, int]], lease_ms: int) -> int:
        if not held:
            return 0
        return int(
            await self._scripts.renew(
                keys=[keys.leases(), keys.lease_owners()],
                args=[worker_id, lease_ms, *(f"{keys.queue_entry(t, j)}|{a}" for t, j, a in held)],
            )
        )
