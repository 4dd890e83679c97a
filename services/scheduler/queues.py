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
            keys=[
                keys.leases(),
                keys.lease_owners(),
                keys.attempts(),
                keys.queue_deadlines(),
                keys.delayed(),
                keys.intents(),
                keys.dead_letters(),
            ],
            args=[op, keys.DISPATCH_PREFIX, *self._weights, *args],
        )

    async def enqueue(self, job: QueuedJob, *, front: bool = False, intent: str = "") -> bool:
        """Puts a job in its line. With an `intent` (see `intend`), only if the intent is still
        open, closing it: of the caller and the reaper finishing it, exactly one enqueues."""
        pushed = await self._dispatch(
            "enqueue",
            job.model,
            job.tier,
            job.tenant,
            job.job_id,
            job.cost,
            "1" if front else "0",
            job.timeout_ms,
            intent,
        )
        if pushed:
            await self._redis.publish(keys.WAKE_CHANNEL, job.model)
        return bool(pushed)

    async def intend(self, kind: str, tenant: str, job_id: str, grace_ms: int) -> str:
        """Records a change that spans two hash slots before its first step, so that if this
        process dies half-way the reaper finishes it after `grace_ms`. Returns the intent."""
        intent = intent_member(kind, tenant, job_id)
        await self._redis.zadd(keys.intents(), {intent: await self.now_ms() + grace_ms})
        return intent

    async def done(self, intent: str) -> None:
        await self._redis.zrem(keys.intents(), intent)

    async def due_intents(self, most: int, grace_ms: int) -> list[tuple[str, str, str]]:
        """(kind, tenant, job id) of intents past their grace, each put off by `grace_ms` again so
        that one replica at a time finishes it."""
        due = await self._dispatch("due_intents", most, grace_ms)
        assert isinstance(due, list)
        out = []
        for raw in due:
            kind, entry = raw.decode().split("|", 1)
            out.append((kind, *keys.parse_queue_entry(entry)))
        return out

    async def now_ms(self) -> int:
        seconds, micros = await self._redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def remove(self, job: QueuedJob) -> bool:
        """Takes a job out of wherever it waits (its line, a backoff, the larger-GPU lane); False
        when it was not there (claimed or expired)."""
        return bool(await self._dispatch("remove", job.model, job.tier, job.tenant, job.job_id, job.cost))

    async def expire_due(self, most: int, grace_ms: int) -> list[tuple[str, str]]:
        """Takes out the jobs whose queue timeout has passed, each with an `expire` intent;
        (tenant, job id) of each."""
        expired = await self._dispatch("expire", most, grace_ms)
        assert isinstance(expired, list)
        return [keys.parse_queue_entry(entry.decode()) for entry in expired]

    async def drop_model(self, model: str, kind: str, grace_ms: int) -> list[tuple[str, str]]:
        """Takes every waiting job of `model` out, each with a `kind` intent to end it."""
        dropped = await self._dispatch("drop_model", model, kind, grace_ms)
        assert isinstance(dropped, list)
        return [keys.parse_queue_entry(entry.decode()) for entry in dropped]

    async def waiting(self, model: str) -> bool:
        return bool(await self._dispatch("waiting", model))

    async def promote_due(self, most: int) -> int:
        """Moves retries whose backoff is over back into line; how many."""
        promoted = await self._dispatch("promote", most)
        assert isinstance(promoted, int)
        return promoted

    async def reap(self, most: int, grace_ms: int) -> list[tuple[str, str, str, int]]:
        """Leases expired at least `grace_ms` ago: (tenant, job id, worker, attempt) of each, put off by
        `grace_ms` so that one replica at a time handles each."""
        flat = await self._dispatch("reap", most, grace_ms)
        assert isinstance(flat, list)
        out = []
        for i in range(0, len(flat), 2):
            tenant, job_id = keys.parse_queue_entry(flat[i].decode())
            worker, _, attempt = flat[i + 1].decode().rpartition(" ")
            out.append((tenant, job_id, worker, int(attempt or 0)))
        return out

    async def retry(self, attempt: int, job: QueuedJob, *, delay_ms: int, min_vram_bytes: int) -> bool:
        """Gives a leased job back in one step: straight to the head of its tenant's line, or after
        `delay_ms`, or to the lane of workers with more than `min_vram_bytes` free. False when
        `attempt` no longer holds the lease."""
        moved = await self._dispatch(
            "requeue",
            keys.queue_entry(job.tenant, job.job_id),
            attempt,
            job.model,
            job.tier,
            job.cost,
            delay_ms,
            min_vram_bytes,
        )
        if moved and not delay_ms and not min_vram_bytes:
            await self._redis.publish(keys.WAKE_CHANNEL, job.model)
        return bool(moved)

    async def bury(self, tenant: str, job_id: str, attempt: int | None) -> bool:
        """Ends the job's lease (if `attempt` holds it) and puts it on the dead-letter list."""
        return bool(
            await self._dispatch("bury", keys.queue_entry(tenant, job_id), "" if attempt is None else attempt)
        )

    async def unbury(self, tenant: str, job_id: str, grace_ms: int) -> str:
        """Takes a job off the dead-letter list with an `enqueue` intent; "" if it was not there."""
        intent = intent_member("enqueue", tenant, job_id)
        taken = await self._dispatch("unbury", keys.queue_entry(tenant, job_id), intent, grace_ms)
        return intent if taken else ""

    async def forget_dead_letter(self, tenant: str, job_id: str) -> None:
        await self._redis.zrem(keys.dead_letters(), keys.queue_entry(tenant, job_id))
        await self._redis.hdel(keys.attempts(), keys.queue_entry(tenant, job_id))

    async def dead_letters(self, limit: int) -> list[tuple[str, str, int]]:
        """(tenant, job id, ms it was buried) of dead letters, oldest first."""
        raw: list[tuple[bytes, float]] = await self._redis.zrange(  # type: ignore[assignment]
            keys.dead_letters(), 0, limit - 1, withscores=True
        )
        return [(*keys.parse_queue_entry(m.decode()), int(score)) for m, score in raw]

    async def stats(self, model: str) -> tuple[int, float]:
        """(compute units queued for `model`, compute units per second served over about a minute)."""
        result = await self._dispatch("stats", model)
        assert isinstance(result, list)
        queued, rate = (v.decode() for v in result)
        return int(float(queued)), float(rate)

    async def claim(
        self, worker_id: str, models: Sequence[str], lease_ms: int, free_vram_bytes: int = 0
    ) -> Claim | None:
        if not models:
            return None
        result = await self._dispatch(
            "claim",
            worker_id,
            lease_ms,
            next(self._rotation) % len(models),
            free_vram_bytes,
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

    async def renew(
        self, worker_id: str, held: Sequence[tuple[str, str, int]], lease_ms: int
    ) -> list[tuple[str, str, int]]:
        """Extends the leases `worker_id` still holds; returns those it no longer holds."""
        if not held:
            return []
        lost = await self._scripts.renew(
            keys=[keys.leases(), keys.lease_owners()],
            args=[worker_id, lease_ms, *(f"{keys.queue_entry(t, j)}|{a}" for t, j, a in held)],
        )
        out = []
        for item in lost:
            entry, _, attempt = item.decode().rpartition("|")
            out.append((*keys.parse_queue_entry(entry), int(attempt)))
        return out


def intent_member(kind: str, tenant: str, job_id: str) -> str:
    return f"{kind}|{keys.queue_entry(tenant, job_id)}"
