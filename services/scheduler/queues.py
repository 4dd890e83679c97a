"""Dispatch state shared by every scheduler replica: per-model FIFO queues, leases, attempts.

Claiming the next job is one Lua step, so two replicas never hand out the same queue entry. The
attempt counter is the fencing token every later message about the job must carry.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from libs import redis_keys as keys
from services.scheduler.scripts import Scripts


@dataclass(frozen=True)
class Claim:
    tenant: str
    job_id: str
    attempt: int
    lease_expire_ms: int


class Queues:
    def __init__(self, redis: Redis, scripts: Scripts) -> None:
        self._redis = redis
        self._scripts = scripts
        self._rotation = itertools.count()

    async def enqueue(self, tenant: str, job_id: str, model: str) -> None:
        await self._redis.rpush(keys.queue(model), keys.queue_entry(tenant, job_id))
        await self._redis.publish(keys.WAKE_CHANNEL, model)

    async def remove(self, tenant: str, job_id: str, model: str) -> None:
        await self._redis.lrem(keys.queue(model), 0, keys.queue_entry(tenant, job_id))

    async def claim(self, worker_id: str, models: Sequence[str], lease_ms: int) -> Claim | None:
        if not models:
            return None
        result = await self._scripts.claim(
            keys=[keys.leases(), keys.lease_owners(), keys.attempts(), *(keys.queue(m) for m in models)],
            args=[worker_id, lease_ms, next(self._rotation) % len(models)],
        )
        if not result:
            return None
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

    async def requeue(self, tenant: str, job_id: str, attempt: int, model: str) -> bool:
        """Gives a leased job back: it goes to the head of its queue, ahead of newer jobs."""
        done = bool(
            await self._scripts.release(
                keys=[keys.leases(), keys.lease_owners(), keys.attempts(), keys.queue(model)],
                args=[keys.queue_entry(tenant, job_id), attempt, "0"],
            )
        )
        if done:
            await self._redis.publish(keys.WAKE_CHANNEL, model)
        return done

    async def renew(self, worker_id: str, held: Sequence[tuple[str, str, int]], lease_ms: int) -> int:
        if not held:
            return 0
        return int(
            await self._scripts.renew(
                keys=[keys.leases(), keys.lease_owners()],
                args=[worker_id, lease_ms, *(f"{keys.queue_entry(t, j)}|{a}" for t, j, a in held)],
            )
        )
