"""API keys and tenants: no key is 401, another tenant's job looks exactly like a missing one."""

from __future__ import annotations

import aiohttp
import grpc
import pytest
from kiln.v1 import job_pb2
from kiln.v1 import job_service_pb2 as pb
from kiln.v1 import job_service_pb2_grpc as pb_grpc
from redis.asyncio import Redis

from libs.api_keys import ApiKeys
from libs.errors import NotFound
from libs.sdk.client import KilnClient
from tests.conftest import Stack
from tests.helpers import auth

pytestmark = pytest.mark.timeout(60)


async def test_missing_and_bad_keys_are_unauthenticated(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        for headers, reason in (
            ({}, "API_KEY_MISSING"),
            (auth("kiln_0000000000000000_" + "x" * 43), "API_KEY_INVALID"),
            ({"Authorization": "Basic abc"}, "API_KEY_MALFORMED"),
        ):
            async with http.get(f"{stack.http_base}/v1/jobs", headers=headers) as resp:
                assert resp.status == 401
                error = (await resp.json())["error"]
            assert error["status"] == "UNAUTHENTICATED"
            assert error["details"][0]["reason"] == reason
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.JobServiceStub(channel).ListJobs(pb.ListJobsRequest())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_other_tenants_job_is_not_found_and_not_listed(stack: Stack) -> None:
    async with KilnClient(stack.grpc_target, stack.key_a) as a:
        job = await a.create_job(
            job_pb2.Job(model="tiny-sd", text_to_image=job_pb2.TextToImage(prompt="mine"))
        )
    async with aiohttp.ClientSession() as http:
        for method, path in (
            ("GET", f"/v1/{job.name}"),
            ("POST", f"/v1/{job.name}:cancel"),
            ("GET", f"/v1/{job.name}:watch"),
            ("GET", f"/v1/{job.name}/artifacts/0:read"),
        ):
            async with http.request(
                method,
                stack.http_base + path,
                headers=auth(stack.key_b),
                json={} if method == "POST" else None,
            ) as resp:
                assert resp.status == 404, path
                error = (await resp.json())["error"]
                assert error["status"] == "NOT_FOUND"
                assert error["details"][0]["reason"] == "JOB_NOT_FOUND"
        async with http.get(f"{stack.http_base}/v1/jobs?pageSize=1000", headers=auth(stack.key_b)) as resp:
            names = [j["name"] for j in (await resp.json()).get("jobs", [])]
        assert job.name not in names
        async with http.get(f"{stack.http_base}/v1/jobs?pageSize=1000", headers=auth(stack.key_a)) as resp:
            assert job.name in [j["name"] for j in (await resp.json())["jobs"]]
    async with KilnClient(stack.grpc_target, stack.key_b) as b:
        with pytest.raises(NotFound):
            await b.get_job(job.name)
    async with KilnClient(stack.grpc_target, stack.key_a) as a:
        assert (await a.get_job(job.name)).name == job.name


async def test_list_jobs_pages_newest_first(stack: Stack) -> None:
    redis = Redis.from_url(stack.redis_url)
    keys = ApiKeys(redis)
    key = await keys.create("tenant-pages")
    await redis.aclose()
    async with KilnClient(stack.grpc_target, key) as client:
        names = [
            (
                await client.create_job(
                    job_pb2.Job(model="tiny-sd", text_to_image=job_pb2.TextToImage(prompt=f"p{i}"))
                )
            ).name
            for i in range(5)
        ]
    seen: list[str] = []
    token = ""
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(
                f"{stack.http_base}/v1/jobs", params={"pageSize": "2", "pageToken": token}, headers=auth(key)
            ) as resp:
                page = await resp.json()
            seen += [j["name"] for j in page["jobs"]]
            token = page.get("nextPageToken", "")
            if not token:
                break
    assert seen == list(reversed(names))


async def test_revoked_key_is_refused(stack: Stack) -> None:
    redis = Redis.from_url(stack.redis_url)
    keys = ApiKeys(redis)
    key = await keys.create("tenant-revoke")
    key_id = key.split("_")[1]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{stack.http_base}/v1/jobs", headers=auth(key)) as resp:
            assert resp.status == 200
        assert await keys.revoke(key_id)
        async with http.get(f"{stack.http_base}/v1/jobs", headers=auth(key)) as resp:
            assert resp.status == 401
    await redis.aclose()
