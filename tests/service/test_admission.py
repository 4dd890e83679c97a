"""Admission under tier limits, against real Redis: exact counts under concurrency, nothing spent
on a refusal, 400 for what can never fit, Retry-After that holds, and the per-tenant queue cap."""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from kiln.scheduler.v1 import scheduler_service_pb2 as spb
from kiln.scheduler.v1 import scheduler_service_pb2_grpc as spb_grpc
from kiln.v1 import job_pb2
from kiln.v1 import job_service_pb2 as pb
from kiln.v1 import job_service_pb2_grpc as pb_grpc
from pydantic import ValidationError
from redis.asyncio import Redis

from libs import redis_keys as keys
from libs.api_keys import ApiKeys
from libs.catalog import ModelSpec
from libs.cost import compute_units
from libs.jobs import TextToImage
from libs.redis_keys import DISPATCH_PREFIX
from libs.rpc_status import from_rpc_error
from libs.settings import SchedulerSettings
from libs.tiers import Tier
from services.scheduler.app import SchedulerApp
from services.scheduler.queues import Queues
from services.scheduler.scripts import Scripts
from tests.conftest import TEST_TIERS, Stack
from tests.helpers import auth

pytestmark = pytest.mark.timeout(90)

UNSERVED = {"model": "unserved", "textToImage": {"prompt": "queued", "seed": "1"}}  # 1 CU, never runs


async def _key(stack: Stack, tenant: str, tier: str) -> tuple[str, str]:
    redis = Redis.from_url(stack.redis_url)
    try:
        key = await ApiKeys(redis).create(tenant, tier)
    finally:
        await redis.aclose()
    return key, key.split("_")[1]


async def _submit(
    http: aiohttp.ClientSession, stack: Stack, key: str, body: dict[str, Any] = UNSERVED
) -> tuple[int, dict[str, str], dict[str, Any]]:
    async with http.post(f"{stack.http_base}/v1/jobs", json=body, headers=auth(key)) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def _policy_state(stack: Stack, tenant: str) -> dict[str, bytes | None]:
    redis = Redis.from_url(stack.redis_url)
    try:
        names = ("cu", "daily_cu", "requests")
        values: list[Any] = [await redis.get(keys.rate_policy(tenant, n)) for n in names]
        usage = await redis.hgetall(keys.usage(tenant))
    finally:
        await redis.aclose()
    return {**dict(zip(names, values, strict=True)), "usage": repr(sorted(usage.items())).encode()}


@pytest.fixture(scope="module")
async def schedulers(stack: Stack) -> AsyncIterator[list[str]]:
    """Three more scheduler replicas on the same Redis, beside the stack's own."""
    extra = [
        SchedulerApp(
            SchedulerSettings(
                redis_url=stack.redis_url,
                scheduler_port=0,
                tiers=TEST_TIERS,
                models=stack.scheduler.settings.models,
            )
        )
        for _ in range(3)
    ]
    for app in extra:
        await app.start()
    yield [f"127.0.0.1:{app.port}" for app in [stack.scheduler, *extra]]
    for app in extra:
        await app.stop()


async def test_burst_of_five_admits_exactly_five_across_four_schedulers(schedulers: list[str]) -> None:
    channels = [grpc.aio.insecure_channel(target) for target in schedulers]
    stubs = [spb_grpc.SchedulerServiceStub(c) for c in channels]
    job = job_pb2.Job(
        model="unserved",
        text_to_image=job_pb2.TextToImage(
            prompt="burst", width=64, height=64, steps=4, guidance_scale=7.5, seed=1, num_images=1
        ),
    )

    async def one(i: int) -> str:
        try:
            await stubs[i % 4].SubmitJob(spb.SubmitJobRequest(tenant="tenant-burst", tier="burst5", job=job))
        except grpc.aio.AioRpcError as exc:
            err = from_rpc_error(exc)
            return f"{exc.code().name}/{err.reason}/{err.metadata.get('policy')}"
        return "OK"

    try:
        outcomes = await asyncio.gather(*(one(i) for i in range(50)))
    finally:
        for channel in channels:
            await channel.close()
    assert outcomes.count("OK") == 5
    assert outcomes.count("RESOURCE_EXHAUSTED/RATE_LIMITED/cu") == 45


async def test_refusals_spend_nothing_and_a_bigger_tier_admits_at_once(stack: Stack) -> None:
    key, key_id = await _key(stack, "tenant-nospend", "burst5")
    async with aiohttp.ClientSession() as http:
        assert [(await _submit(http, stack, key))[0] for _ in range(5)] == [200] * 5
        before = await _policy_state(stack, "tenant-nospend")
        refused = await asyncio.gather(*(_submit(http, stack, key) for _ in range(20)))
        assert {status for status, _, _ in refused} == {429}
        assert await _policy_state(stack, "tenant-nospend") == before
        redis = Redis.from_url(stack.redis_url)
        assert await ApiKeys(redis).set_tier(key_id, "burst100")
        await redis.aclose()
        status, headers, job = await _submit(http, stack, key)
    assert status == 200
    assert job["state"] == "STATE_QUEUED"
    # The move kept what was spent (6 CU of the new burst of 100), rather than rescaling it.
    assert headers["RateLimit"].startswith('"cu";r=94;')


async def test_no_partial_spend_when_only_the_daily_policy_refuses(stack: Stack) -> None:
    key, _ = await _key(stack, "tenant-daily", "daily3")
    async with aiohttp.ClientSession() as http:
        assert [(await _submit(http, stack, key))[0] for _ in range(3)] == [200] * 3
        before = await _policy_state(stack, "tenant-daily")
        status, _, body = await _submit(http, stack, key)
        assert status == 429
        assert body["error"]["details"][0]["metadata"]["policy"] == "daily_cu"
        quota = next(d for d in body["error"]["details"] if d["@type"].endswith("QuotaFailure"))
        assert quota["violations"] == [
            {"subject": "tenant:tenant-daily", "description": "daily_cu: limit 3 (daily3 tier)"}
        ]
        assert await _policy_state(stack, "tenant-daily") == before


async def test_a_cost_above_the_burst_is_400_every_time(stack: Stack) -> None:
    key, _ = await _key(stack, "tenant-toobig", "burst5")
    big = {"model": "unserved", "textToImage": {"prompt": "big", "width": 1024, "height": 1024, "steps": 50}}
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            status, _, body = await _submit(http, stack, key, big)
            assert status == 400
            info = body["error"]["details"][0]
            assert info["reason"] == "COST_EXCEEDS_TIER"
            assert info["metadata"] == {"cost": "8", "limit": "5", "policy": "cu_burst", "tier": "burst5"}
        assert (await _submit(http, stack, key))[0] == 200  # and it spent nothing


async def test_retry_after_is_a_whole_second_count_that_then_succeeds(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Admission runs on Redis's clock: the app's time zone and clock do not change the answer."""
    monkeypatch.setenv("TZ", "Europe/Vienna")
    time.tzset()
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3 * 3600 + 17)
    try:
        key, _ = await _key(stack, "tenant-retry", "retry2s")
        async with aiohttp.ClientSession() as http:
            assert (await _submit(http, stack, key))[0] == 200
            status, headers, body = await _submit(http, stack, key)
            assert status == 429
            retry_after = headers["Retry-After"]
            assert retry_after.isdigit() and int(retry_after) >= 1
            delay = float(body["error"]["details"][-1]["retryDelay"].rstrip("s"))
            assert int(retry_after) == math.ceil(delay) == 2
            await asyncio.sleep(int(retry_after))
            assert (await _submit(http, stack, key))[0] == 200
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert os.environ.get("TZ") is None


async def test_queue_cap_of_ten_accepts_exactly_ten_of_fifty(stack: Stack) -> None:
    key, _ = await _key(stack, "tenant-qcap", "qcap10")
    async with aiohttp.ClientSession() as http:
        results = await asyncio.gather(*(_submit(http, stack, key) for _ in range(50)))
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == 10
    assert statuses.count(503) == 40
    refused = next(body for status, _, body in results if status == 503)
    assert refused["error"]["details"][0]["reason"] == "QUEUE_FULL"
    assert all(headers["Retry-After"].isdigit() for status, headers, _ in results if status == 503)


async def test_tier_caps_are_checked_at_the_door(stack: Stack) -> None:
    key, _ = await _key(stack, "tenant-free", "free")
    body = {"model": "tiny-sd", "textToImage": {"prompt": "big", "width": 1024, "height": 1024}}
    async with aiohttp.ClientSession() as http:
        status, _, error = await _submit(http, stack, key, body)
    assert status == 400
    bad = next(d for d in error["error"]["details"] if d["@type"].endswith("BadRequest"))
    assert bad["fieldViolations"] == [
        {
            "field": "job.text_to_image.width",
            "description": "width x height must be at most 589824 pixels on the free tier, got 1024x1024",
        }
    ]


def test_cost_grows_with_pixels_steps_and_images() -> None:
    sd = ModelSpec(source="/x", cost_factor=1.0)

    def cu(w: int, h: int, steps: int = 25, n: int = 1) -> int:
        return compute_units(TextToImage("p", "", w, h, steps, 7.5, 1, n), sd.cost_factor)

    assert cu(512, 512) == 1
    assert cu(1024, 1024) == 4
    assert cu(2048, 2048) == 16
    assert cu(2048, 2048) > 10 * cu(256, 256)
    assert cu(512, 512, steps=50) == 2
    assert cu(512, 512, n=4) == 4
    assert compute_units(TextToImage("p", "", 64, 64, 4, 7.5, 1, 1), 0.05) == 1


async def test_every_authenticated_answer_carries_ratelimit_fields(stack: Stack) -> None:
    key, _ = await _key(stack, "tenant-headers", "burst5")
    policy = '"cu";q=5;w=500, "daily_cu";q=100000;w=86400, "requests";q=1000;w=1'
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{stack.http_base}/v1/jobs", headers=auth(key)) as resp:
            assert resp.headers["RateLimit-Policy"] == policy
            assert resp.headers["RateLimit"] == '"cu";r=5;t=0, "daily_cu";r=100000;t=0, "requests";r=1000;t=0'
        for _ in range(2):
            status, headers, _ = await _submit(http, stack, key)
        assert status == 200
        assert headers["RateLimit"].startswith('"cu";r=3;t=200, "daily_cu";r=99998;t=2, "requests";r=')
        for _ in range(3):
            await _submit(http, stack, key)
        status, headers, _ = await _submit(http, stack, key)
        assert status == 429
        assert headers["RateLimit"].startswith('"cu";r=0;t=500')
        async with http.get(
            f"{stack.http_base}/v1/jobs/01m8y0vm6w4w14c1j0xv06285r", headers=auth(key)
        ) as resp:
            assert resp.status == 404
            assert resp.headers["RateLimit-Policy"] == policy
        async with http.get(f"{stack.http_base}/v1/jobs", headers={"Authorization": "Bearer nope"}) as resp:
            assert resp.status == 401
            assert "RateLimit" not in resp.headers
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        call = pb_grpc.JobServiceStub(channel).ListJobs(
            pb.ListJobsRequest(), metadata=(("authorization", f"Bearer {key}"),)
        )
        await call
        metadata = {k: str(v) for k, v in await call.initial_metadata()}
    assert metadata["ratelimit-policy"] == policy
    assert metadata["ratelimit"].startswith('"cu";r=0;t=')


async def test_estimate_prices_and_predicts_without_spending(stack: Stack) -> None:
    key, _ = await _key(stack, "tenant-estimate", "burst5")
    big = {"model": "unserved", "textToImage": {"prompt": "x", "width": 512, "height": 512, "steps": 25}}
    async with aiohttp.ClientSession() as http:

        async def estimate(body: dict[str, Any]) -> dict[str, Any]:
            async with http.post(f"{stack.http_base}/v1/jobs:estimate", json=body, headers=auth(key)) as resp:
                assert resp.status == 200, await resp.text()
                result: dict[str, Any] = await resp.json()
                return result

        before = await _policy_state(stack, "tenant-estimate")
        first = await estimate(big)
        assert (first["costUnits"], first["admissibleNow"]) == ("1", True)
        assert await _policy_state(stack, "tenant-estimate") == before
        for _ in range(5):
            assert (await _submit(http, stack, key))[0] == 200
        spent = await estimate(big)
    assert "admissibleNow" not in spent  # proto3 JSON leaves out false
    assert spent["limitingPolicy"] == "cu"
    assert float(spent["retryAfter"].rstrip("s")) > 0


async def test_jobs_that_would_outwait_the_tier_are_refused_with_503(stack: Stack) -> None:
    key, _ = await _key(stack, "tenant-longwait", "burst100")  # max_queue_wait_s 600
    body = {"model": "metered", "textToImage": {"prompt": "x", "seed": "1"}}
    async with aiohttp.ClientSession() as http:
        for _ in range(25):  # no rate measured yet: all admitted
            assert (await _submit(http, stack, key, body))[0] == 200
        redis = Redis.from_url(stack.redis_url)
        queues = Queues(redis, Scripts(redis), {"burst100": 1})
        assert await queues.claim("meter", ["metered"], 60_000) is not None  # 1 CU served: ~1/60 CU/s
        # As if the queue had been busy for ten minutes: the estimate is past its start-up correction.
        await redis.hset(f"{DISPATCH_PREFIX}vt:metered", "busy_since", await queues.now_ms() - 600_000)
        await redis.aclose()
        status, headers, error = await _submit(http, stack, key, body)
        async with http.post(f"{stack.http_base}/v1/jobs:estimate", json=body, headers=auth(key)) as resp:
            estimate = await resp.json()
    assert status == 503
    assert error["error"]["details"][0]["reason"] == "EXPECTED_WAIT_TOO_LONG"
    assert headers["Retry-After"].isdigit()
    assert (estimate["queuedUnits"], estimate.get("admissibleNow"), estimate["limitingPolicy"]) == (
        "24",
        None,  # proto3 JSON leaves out false
        "max_queue_wait_s",
    )
    assert 1400 < float(estimate["expectedWait"].rstrip("s")) < 1600  # (24 + 1) CU at 1/60 CU/s


async def test_retry_after_covers_every_refusing_policy(stack: Stack) -> None:
    """Both the CU (1 s) and the request (10 s) policies refuse: the answer is the longer wait."""
    key, _ = await _key(stack, "tenant-two-policies", "two-policies")
    async with aiohttp.ClientSession() as http:
        assert (await _submit(http, stack, key))[0] == 200
        status, headers, body = await _submit(http, stack, key)
    assert status == 429
    assert body["error"]["details"][0]["metadata"]["policy"] == "requests"
    assert headers["Retry-After"] == "10"


def test_tier_values_are_strict() -> None:
    base = TEST_TIERS["burst5"]
    for bad in (
        {"cu_per_second": float("inf")},
        {"cu_burst": "20"},
        {"requests_per_second": 1e-300},
        {"max_queue_wait_s": 0.0001},
        {"cu_burst": True},
    ):
        with pytest.raises(ValidationError):
            Tier.model_validate({**base, **bad})
    assert Tier.model_validate(base).cu_burst == 5
