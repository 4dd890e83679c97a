"""Admission and dispatch against a private Redis, each beside its floor, in one run.

- admission decisions per second (the create script: idempotency, caps, three GCRA policies,
  the job, its event and counters), admitted and refused, against a plain INCR round trip;
- the time to claim the next job with 1,000 and with 1,000,000 jobs queued;
- Redis memory per queued job.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from redis.asyncio import Redis

from libs import redis_keys as keys
from libs.jobs import TextToImage
from libs.redis_server import RedisServer
from libs.tiers import Tier
from services.scheduler.admission import terms
from services.scheduler.queues import QueuedJob, Queues, queued
from services.scheduler.scripts import Scripts
from services.scheduler.store import JobStore

SPEC = TextToImage("a red fox", "", 512, 512, 25, 7.5, 7, 1)
ROOMY = Tier(
    cu_per_second=1e6,
    cu_burst=10**9,
    daily_cu_quota=10**12,
    requests_per_second=1e6,
    request_burst=10**9,
    max_in_flight=10**9,
    max_queued_cu=10**12,
    max_pixels=2048**2,
    max_steps=150,
    max_num_images=4,
    dispatch_weight=1,
    max_queue_wait_s=3600,
)
EXHAUSTED = ROOMY.model_copy(update={"cu_per_second": 1e-6, "cu_burst": 1})


async def rate(op: Callable[[int], Awaitable[object]], count: int, concurrency: int) -> float:
    """Operations per second with `concurrency` callers sharing `count` operations."""

    async def worker(offset: int) -> None:
        for i in range(offset, count, concurrency):
            await op(i)

    start = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in range(concurrency)))
    return count / (time.perf_counter() - start)


async def claim_latency_us(redis: Redis, queues: Queues, depth: int, samples: int) -> float:
    """Median claim time with `depth` jobs queued over 3 tiers and depth/1000 tenants per tier."""
    model = f"bench-{depth}"
    tenants = max(1, depth // 1000)
    per_list = (depth + samples) // (3 * tenants) + 1
    for tier in ("free", "pro", "enterprise"):
        for t in range(tenants):
            tenant = f"t{t}"
            await queues.enqueue(QueuedJob(tenant, tier, "0" * 26, model, 1))  # makes the tenant active
            items = [f"{i:026d} 1" for i in range(1, per_list)]
            await redis.rpush(f"{keys.DISPATCH_PREFIX}q:{model}:{tier}:{tenant}", *items)
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        claim = await queues.claim("bench-worker", [model], 30_000)
        times.append(time.perf_counter() - t0)
        assert claim is not None
    await redis.flushdb()
    return statistics.median(times) * 1e6


async def main(count: int) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        server = RedisServer(Path(workdir), appendonly=False)
        server.start()
        redis = Redis.from_url(server.url, max_connections=64)
        try:
            scripts = Scripts(redis)
            store = JobStore(redis, scripts, job_ttl_s=3600, artifact_ttl_s=3600)
            queues = Queues(redis, scripts, {"free": 1, "pro": 4, "enterprise": 16})
            admit, refuse = terms("roomy", ROOMY, 1), terms("exhausted", EXHAUSTED, 1)
            await store.create("bench-refused", "tiny-sd", SPEC, refuse)  # spends the only unit

            async def incr(_: int) -> object:
                return await redis.incr("bench:counter")

            async def admitted(i: int) -> object:
                return await store.create(f"bench-{i % 64}", "tiny-sd", SPEC, admit)

            async def refused(_: int) -> object:
                try:
                    await store.create("bench-refused", "tiny-sd", SPEC, refuse)
                except Exception as exc:  # the refusal is the decision being measured
                    return exc
                raise AssertionError("admitted past an exhausted policy")

            print(f"\nadmission decisions per second ({count} each, private redis-server, 2 cores)")
            print(f"{'':<42}{'1 client':>12}{'16 clients':>12}")
            for label, op in (
                ("INCR round trip (floor)", incr),
                ("admit + create job (Lua)", admitted),
                ("refuse (Lua, nothing written)", refused),
            ):
                one, many = await rate(op, count, 1), await rate(op, count, 16)
                print(f"{label:<42}{one:>12,.0f}{many:>12,.0f}")

            print("\nclaiming the next job (median of 1,000 claims)")
            for depth in (1_000, 1_000_000):
                print(f"{depth:>12,} queued: {await claim_latency_us(redis, queues, depth, 1_000):8.1f} us")

            await redis.flushdb()
            before = int((await redis.info("memory"))["used_memory"])
            jobs = 10_000
            for i in range(jobs):
                record, _ = await store.create(f"tenant-{i % 100}", "tiny-sd", SPEC, admit)
                await queues.enqueue(queued(record))
            after = int((await redis.info("memory"))["used_memory"])
            print(
                f"\nRedis memory per queued job: {(after - before) / jobs:,.0f} bytes "
                f"({jobs:,} jobs: hash, first event, index entry, queue entry, counters)"
            )
        finally:
            await redis.aclose()
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=5000)
    asyncio.run(main(parser.parse_args().count))
