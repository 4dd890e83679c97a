"""Fair dispatch against real Redis: by tier weight across tiers, by compute units across a tier's
tenants, in order within a tenant, with no starvation, and queue timeouts that fire on time."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import code_pb2
from kiln.v1 import job_pb2
from redis.asyncio import Redis

from libs.api_keys import ApiKeys
from libs.sdk.client import KilnClient
from libs.settings import WorkerSettings
from services.gpu_worker.app import WorkerApp
from services.scheduler.queues import QueuedJob, Queues
from services.scheduler.scripts import Scripts
from tests.conftest import Stack
from tests.helpers import auth, rest_wait

pytestmark = pytest.mark.timeout(90)

WEIGHTS = {"free": 1, "pro": 4, "enterprise": 16}
_models = itertools.count()
_ids = itertools.count()


@pytest.fixture
async def queues(stack: Stack) -> AsyncIterator[tuple[Queues, str]]:
    """The real dispatch script on a model of the test's own, so no worker takes its jobs."""
    redis = Redis.from_url(stack.redis_url)
    yield Queues(redis, Scripts(redis), WEIGHTS), f"dispatch-test-{next(_models)}"
    await redis.aclose()


async def _add(
    queues: Queues, model: str, tier: str, tenant: str, cost: int = 1, count: int = 1
) -> list[str]:
    ids = []
    for _ in range(count):
        job_id = f"{next(_ids):026d}"
        await queues.enqueue(QueuedJob(tenant, tier, job_id, model, cost))
        ids.append(job_id)
    return ids


async def _next(queues: Queues, model: str) -> tuple[str, str]:
    claim = await queues.claim("test-worker", [model], 60_000)
    assert claim is not None
    return claim.tenant, claim.job_id


async def _free_job_behind_paid_backlogs(q: Queues, model: str) -> str:
    """Pro and enterprise backlogs, dispatch under way, then one free job; returns its id."""
    await _add(q, model, "pro", "p", count=500)
    await _add(q, model, "enterprise", "e", count=500)
    for _ in range(50):
        await _next(q, model)
    [free_job] = await _add(q, model, "free", "f")
    return free_job


async def test_a_pro_job_goes_before_a_hundred_queued_free_jobs(queues: tuple[Queues, str]) -> None:
    q, model = queues
    await _add(q, model, "free", "free-tenant", count=100)
    [pro_job] = await _add(q, model, "pro", "pro-tenant")
    assert await _next(q, model) == ("pro-tenant", pro_job)


async def test_one_job_of_another_tenant_starts_within_one_round_of_a_flood(
    queues: tuple[Queues, str],
) -> None:
    q, model = queues
    flood = await _add(q, model, "pro", "tenant-a", count=1000)
    for job_id in flood[:3]:
        assert await _next(q, model) == ("tenant-a", job_id)
    [b_job] = await _add(q, model, "pro", "tenant-b")
    assert await _next(q, model) == ("tenant-b", b_job)
    assert await _next(q, model) == ("tenant-a", flood[3])  # and A's line kept its order


async def test_tenants_of_a_tier_share_compute_units_not_job_counts(queues: tuple[Queues, str]) -> None:
    q, model = queues
    await _add(q, model, "pro", "big-jobs", cost=10, count=300)
    await _add(q, model, "pro", "small-jobs", cost=1, count=3000)
    served: Counter[str] = Counter()
    for _ in range(1000):
        tenant, _ = await _next(q, model)
        served[tenant] += 10 if tenant == "big-jobs" else 1
    assert abs(served["big-jobs"] - served["small-jobs"]) <= 0.1 * max(served.values())


async def test_tiers_share_by_weight_and_idle_shares_go_to_the_rest(queues: tuple[Queues, str]) -> None:
    q, model = queues
    await _add(q, model, "free", "f", count=500)
    await _add(q, model, "enterprise", "e", count=500)
    claims = Counter([(await _next(q, model))[0] for _ in range(170)])
    assert claims == {"e": 160, "f": 10}  # 16 : 1, and pro's idle share went to both


async def test_a_free_job_behind_an_endless_paid_backlog_starts_within_the_bound(
    queues: tuple[Queues, str],
) -> None:
    """The bound: a free job of c CU waits behind at most (4 + 16) x c CU of paid work, plus one job."""
    q, model = queues
    free_job = await _free_job_behind_paid_backlogs(q, model)
    order = [await _next(q, model) for _ in range(21)]
    assert ("f", free_job) in order


async def test_new_arrivals_in_a_tier_do_not_push_back_its_waiting_job(queues: tuple[Queues, str]) -> None:
    """Other free tenants keep arriving; the free tier's waiting job still starts within the bound."""
    q, model = queues
    free_job = await _free_job_behind_paid_backlogs(q, model)
    order = []
    for claim in range(21):
        if claim % 5 == 0:
            await _add(q, model, "free", f"z{claim}")
        order.append(await _next(q, model))
    assert ("f", free_job) in order


async def test_removed_and_requeued_jobs_keep_the_sets_consistent(queues: tuple[Queues, str]) -> None:
    q, model = queues
    first, second = await _add(q, model, "pro", "t", count=2)
    assert await q.remove(QueuedJob("t", "pro", first, model, 1))
    assert not await q.remove(QueuedJob("t", "pro", first, model, 1))
    assert await _next(q, model) == ("t", second)
    assert await q.claim("test-worker", [model], 60_000) is None


async def test_a_queued_job_expires_on_time_while_the_only_worker_is_busy(stack: Stack) -> None:
    """A one-slot worker is the only one serving `solo`; it is busy with a long job while a job with
    a 2 s queue timeout waits behind it. The waiting job fails at 2-3 s, not when the long job ends."""
    worker = WorkerApp(
        WorkerSettings(
            redis_url=stack.redis_url,
            scheduler_address=f"127.0.0.1:{stack.scheduler.port}",
            worker_slots=1,
            # Nothing held in reserve: the waiting job must stay in the queue, where it times out.
            worker_prefetch=0,
            worker_id="solo-worker",
            models=stack.scheduler.settings.models,
            worker_models=["solo"],
        )
    )
    await worker.start()
    assert worker.link is not None
    await asyncio.wait_for(worker.link.connected.wait(), timeout=30)
    async with KilnClient(stack.grpc_target, stack.key_a) as client:
        try:
            long_job = await client.create_job(
                job_pb2.Job(
                    model="solo",
                    text_to_image=job_pb2.TextToImage(prompt="long", width=512, height=512, steps=150),
                )
            )
            async for event in client.watch(long_job.name):
                if event.job.progress.step >= 1:
                    break  # the worker is busy with it now
            waiting = job_pb2.Job(model="solo", text_to_image=job_pb2.TextToImage(prompt="waits"))
            waiting.queue_timeout.FromSeconds(2)
            short = await client.create_job(waiting)
            async for event in client.watch(short.name):
                final = event.job
            running = await client.get_job(long_job.name)
        finally:
            await client.cancel_job(long_job.name)
            await worker.stop()
    assert final.state == job_pb2.Job.STATE_FAILED
    assert final.error.code == code_pb2.DEADLINE_EXCEEDED
    assert 2000 <= final.end_time.ToMilliseconds() - final.create_time.ToMilliseconds() <= 3000
    assert final.attempt == 0  # never dispatched
    assert running.state == job_pb2.Job.STATE_RUNNING  # the long job was still running


async def test_a_queued_job_past_its_queue_timeout_fails_on_time(stack: Stack) -> None:
    redis = Redis.from_url(stack.redis_url)
    key = await ApiKeys(redis).create("tenant-timeout", "enterprise")
    await redis.aclose()
    body = {"model": "unserved", "queueTimeout": "2s", "textToImage": {"prompt": "nobody serves this"}}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{stack.http_base}/v1/jobs", json=body, headers=auth(key)) as resp:
            job = await resp.json()
        assert job["queueTimeout"] == "2s"
        done = await rest_wait(http, stack.http_base, key, job["name"], timeout_s=10)
        async with http.post(
            f"{stack.http_base}/v1/jobs", json={**body, "queueTimeout": "7200s"}, headers=auth(key)
        ) as resp:
            too_long = await resp.json()
    assert done["state"] == "STATE_FAILED"
    assert done["error"]["code"] == 4  # DEADLINE_EXCEEDED
    assert done["error"]["details"][0]["reason"] == "QUEUE_TIMEOUT"
    waited_ms = _ms(done["endTime"]) - _ms(done["createTime"])
    assert 2000 <= waited_ms <= 3000
    assert too_long["error"]["details"][-1]["fieldViolations"][0]["field"] == "job.queue_timeout"


def _ms(rfc3339: str) -> int:
    ts = timestamp_pb2.Timestamp()
    ts.FromJsonString(rfc3339)
    return ts.ToMilliseconds()
