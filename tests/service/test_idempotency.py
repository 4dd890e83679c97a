"""CreateJob's request_id (AIP-155) and the IETF Idempotency-Key header: one job per API key and
request id, charged once, replays flagged, a different body refused with 422/FAILED_PRECONDITION."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any, cast

import aiohttp
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from kiln.v1 import job_pb2
from kiln.v1 import job_service_pb2 as pb
from kiln.v1 import job_service_pb2_grpc as pb_grpc
from redis.asyncio import Redis

from libs import redis_keys as keys
from libs.api_keys import ApiKeys
from tests.conftest import Stack
from tests.helpers import auth

pytestmark = pytest.mark.timeout(60)

# Queued for good (no worker serves it), so the tenant's usage counters hold still; cost 1 CU.
BODY: dict[str, Any] = {"model": "unserved", "textToImage": {"prompt": "once", "seed": "3"}}
JOB = job_pb2.Job(model="unserved", text_to_image=job_pb2.TextToImage(prompt="once", seed=3))
# "daily3" allows 3 CU a day: a replay charged again would soon be refused with 429. Its daily
# policy's state also outlives the test, so the units it holds can be read exactly.
TIER = "daily3"


async def _fresh_tenant(stack: Stack, keys_wanted: int = 1) -> tuple[str, list[str]]:
    tenant = f"idem-{secrets.token_hex(4)}"
    redis = Redis.from_url(stack.redis_url)
    try:
        api_keys = ApiKeys(redis)
        return tenant, [await api_keys.create(tenant, TIER) for _ in range(keys_wanted)]
    finally:
        await redis.aclose()


async def _assert_charged_once(stack: Stack, tenant: str, job_names: set[str]) -> None:
    """Exactly one job's worth of usage and rate: in the counters, every policy's units, the index."""
    redis = Redis.from_url(stack.redis_url)
    try:
        usage = await redis.hgetall(keys.usage(tenant))
        assert usage == {b"in_flight": b"1", b"queued_cu": b"1"}
        # Its state is written by the one charge; a day's quota of 3 drains too slowly to expire.
        daily = await redis.get(keys.rate_policy(tenant, "daily_cu"))
        assert isinstance(daily, bytes) and daily.split(b":")[0] == b"1.000000"
        indexed = cast(list[bytes], await redis.zrange(keys.tenant_jobs(tenant), 0, -1))
        assert {f"jobs/{raw.decode()}" for raw in indexed} == job_names
    finally:
        await redis.aclose()


async def _rest_create(
    http: aiohttp.ClientSession,
    stack: Stack,
    key: str,
    body: dict[str, Any],
    *,
    query: str = "",
    **headers: str,
) -> tuple[int, dict[str, Any], str | None]:
    async with http.post(
        f"{stack.http_base}/v1/jobs{query}", json=body, headers={**auth(key), **headers}
    ) as resp:
        return resp.status, await resp.json(), resp.headers.get("Idempotent-Replayed")


async def _grpc_create(
    stub: pb_grpc.JobServiceStub, key: str, job: job_pb2.Job, request_id: str
) -> tuple[str, str | None]:
    call = stub.CreateJob(
        pb.CreateJobRequest(job=job, request_id=request_id), metadata=(("authorization", f"Bearer {key}"),)
    )
    reply = await call
    metadata = dict(await call.initial_metadata())
    replayed = metadata.get("idempotent-replayed")
    return reply.job.name, replayed if isinstance(replayed, str) else None


async def test_twenty_parallel_rest_retries_make_one_job_charged_once(stack: Stack) -> None:
    tenant, [key] = await _fresh_tenant(stack)
    async with aiohttp.ClientSession() as http:
        results = await asyncio.gather(
            *(_rest_create(http, stack, key, BODY, query="?requestId=rest-20") for _ in range(20))
        )
    assert [status for status, _, _ in results] == [200] * 20
    names = {job["name"] for _, job, _ in results}
    assert len(names) == 1
    assert sorted(str(replayed) for _, _, replayed in results) == ["None"] + ["true"] * 19
    await _assert_charged_once(stack, tenant, names)


async def test_twenty_parallel_grpc_retries_make_one_job_charged_once(stack: Stack) -> None:
    tenant, [key] = await _fresh_tenant(stack)
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        stub = pb_grpc.JobServiceStub(channel)
        results = await asyncio.gather(*(_grpc_create(stub, key, JOB, "grpc-20") for _ in range(20)))
    names = {name for name, _ in results}
    assert len(names) == 1
    assert sorted(str(replayed) for _, replayed in results) == ["None"] + ["true"] * 19
    await _assert_charged_once(stack, tenant, names)


async def test_the_same_request_id_with_another_body_is_422_over_rest(stack: Stack) -> None:
    _, [key] = await _fresh_tenant(stack)
    async with aiohttp.ClientSession() as http:
        status, first, _ = await _rest_create(http, stack, key, BODY, query="?requestId=body-1")
        assert status == 200
        other = {**BODY, "textToImage": {"prompt": "twice", "seed": "3"}}
        status, error, replayed = await _rest_create(http, stack, key, other, query="?requestId=body-1")
    assert (status, replayed) == (422, None)
    assert error["error"]["code"] == 422
    assert error["error"]["status"] == "FAILED_PRECONDITION"
    [info] = [d for d in error["error"]["details"] if d["@type"].endswith("ErrorInfo")]
    assert info == {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "REQUEST_ID_REUSED",
        "domain": "kiln.dev",
        "metadata": {"request_id": "body-1", "job": first["name"]},
    }


async def test_the_same_request_id_with_another_body_is_failed_precondition_over_grpc(stack: Stack) -> None:
    _, [key] = await _fresh_tenant(stack)
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        stub = pb_grpc.JobServiceStub(channel)
        name, replayed = await _grpc_create(stub, key, JOB, "body-2")
        assert replayed is None
        other = job_pb2.Job(model="unserved", text_to_image=job_pb2.TextToImage(prompt="twice", seed=3))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _grpc_create(stub, key, other, "body-2")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    status = rpc_status.from_call(caught.value)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, dict(info.metadata)) == ("REQUEST_ID_REUSED", {"request_id": "body-2", "job": name})


async def test_the_idempotency_key_header_is_the_request_id(stack: Stack) -> None:
    tenant, [key] = await _fresh_tenant(stack)
    async with aiohttp.ClientSession() as http:
        status, first, replayed = await _rest_create(http, stack, key, BODY, **{"Idempotency-Key": "hdr-1"})
        assert (status, replayed) == (200, None)
        # The draft's structured-field form ("quoted"), and the same id in both places, are the same.
        for query, header in (("", '"hdr-1"'), ("?requestId=hdr-1", "hdr-1")):
            status, again, replayed = await _rest_create(
                http, stack, key, BODY, query=query, **{"Idempotency-Key": header}
            )
            assert (status, again["name"], replayed) == (200, first["name"], "true")
        # ... and as the body's request_id over gRPC.
        async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
            name, grpc_replayed = await _grpc_create(pb_grpc.JobServiceStub(channel), key, JOB, "hdr-1")
        assert (name, grpc_replayed) == (first["name"], "true")
        status, error, _ = await _rest_create(
            http, stack, key, BODY, query="?requestId=hdr-2", **{"Idempotency-Key": "hdr-3"}
        )
    assert status == 400
    assert error["error"]["status"] == "INVALID_ARGUMENT"
    [info] = [d for d in error["error"]["details"] if d["@type"].endswith("ErrorInfo")]
    assert (info["reason"], info["metadata"]) == ("INVALID_FIELD", {"field": "request_id"})
    [bad] = [d for d in error["error"]["details"] if d["@type"].endswith("BadRequest")]
    assert [v["field"] for v in bad["fieldViolations"]] == ["request_id"]
    await _assert_charged_once(stack, tenant, {first["name"]})


async def test_two_api_keys_of_one_tenant_get_two_jobs_for_one_request_id(stack: Stack) -> None:
    tenant, [key_1, key_2] = await _fresh_tenant(stack, keys_wanted=2)
    async with aiohttp.ClientSession() as http:
        status_1, job_1, replayed_1 = await _rest_create(http, stack, key_1, BODY, query="?requestId=shared")
        status_2, job_2, replayed_2 = await _rest_create(http, stack, key_2, BODY, query="?requestId=shared")
        # Each key still replays its own.
        status_3, job_3, replayed_3 = await _rest_create(http, stack, key_2, BODY, query="?requestId=shared")
    assert (status_1, status_2, status_3) == (200, 200, 200)
    assert (replayed_1, replayed_2, replayed_3) == (None, None, "true")
    assert job_1["name"] != job_2["name"]
    assert job_3["name"] == job_2["name"]
    redis = Redis.from_url(stack.redis_url)
    try:
        assert await redis.zcard(keys.tenant_jobs(tenant)) == 2
        assert await redis.hget(keys.usage(tenant), "in_flight") == b"2"
    finally:
        await redis.aclose()


async def test_the_openapi_document_lists_the_idempotency_key_header(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http, http.get(f"{stack.http_base}/openapi.json") as resp:
        doc = await resp.json()
    create = doc["paths"]["/v1/jobs"]["post"]
    assert [(p["name"], p["in"]) for p in create["parameters"]] == [
        ("requestId", "query"),
        ("Idempotency-Key", "header"),
    ]
    assert [p["name"] for p in doc["paths"]["/v1/jobs:estimate"]["post"]["parameters"]] == []
