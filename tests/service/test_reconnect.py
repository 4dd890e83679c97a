"""Redis and the scheduler restart under a running gateway: calls during the outage are UNAVAILABLE
(503) with a clear reason, open watches end with UNAVAILABLE and reattach from their last event
id, and everything works again afterwards with no manual step."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from kiln.v1 import job_service_pb2 as pb
from kiln.v1 import job_service_pb2_grpc as pb_grpc
from redis.asyncio import Redis

from libs import redis_keys as keys
from libs.api_keys import ApiKeys
from libs.catalog import ModelSpec
from libs.redis_server import RedisServer, free_port
from libs.settings import GatewaySettings, SchedulerSettings
from services.gateway.app import GatewayApp
from services.scheduler.app import SchedulerApp
from tests.helpers import auth, sse_events

pytestmark = pytest.mark.timeout(90)

# No worker runs here: jobs stay queued until cancelled, which is all a watch needs.
MODELS = {"unserved": ModelSpec(source="/nonexistent", size_multiple=16, default_size=64, default_steps=4)}
BODY = {"model": "unserved", "textToImage": {"prompt": "waits", "seed": "1"}}
OUTAGE_BOUND_S = 10  # how long a watch may take to notice that its Redis or scheduler went away
SCHEDULER_GRACE_BOUND_S = 30  # a stopping scheduler's grace for open streams, and some


@dataclass
class Private:
    """A gateway and scheduler of their own, on a Redis of their own (AOF on) that a test restarts."""

    redis_server: RedisServer
    scheduler_settings: SchedulerSettings
    scheduler: SchedulerApp
    gateway: GatewayApp
    key: str

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.gateway.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.gateway.grpc_port}"


@pytest.fixture
async def private(tmp_path: Path) -> AsyncIterator[Private]:
    redis_server = RedisServer(tmp_path / "redis", appendonly=True)
    redis_server.start()
    settings = SchedulerSettings(
        redis_url=redis_server.url,
        scheduler_port=free_port(),  # fixed, so that a restarted scheduler is found at the same address
        redis_socket_timeout_seconds=1.0,
        dispatch_poll_seconds=0.2,
        models=MODELS,
    )
    scheduler = SchedulerApp(settings)
    await scheduler.start()
    gateway = GatewayApp(
        GatewaySettings(
            redis_url=redis_server.url,
            scheduler_address=f"127.0.0.1:{settings.scheduler_port}",
            gateway_grpc_port=0,
            gateway_http_port=0,
            redis_socket_timeout_seconds=1.0,
            shutdown_grace_seconds=1.0,
            models=MODELS,
        )
    )
    await gateway.start()
    redis = Redis.from_url(redis_server.url)
    key = await ApiKeys(redis).create("reconnect", "enterprise")
    await redis.aclose()
    stack = Private(redis_server, settings, scheduler, gateway, key)
    yield stack
    await stack.gateway.stop()
    await stack.scheduler.stop()
    redis_server.stop()


def _grpc_error(exc: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str]:
    status = rpc_status.from_call(exc)
    info = error_details_pb2.ErrorInfo()
    assert status is not None and status.details[0].Unpack(info)
    return exc.code(), info.reason


def _rest_reason(body: dict[str, Any]) -> tuple[str, str]:
    error = body["error"]
    info = next(d for d in error["details"] if d["@type"].endswith("ErrorInfo"))
    return error["status"], info["reason"]


async def _create(http: aiohttp.ClientSession, stack: Private) -> dict[str, Any]:
    async with http.post(f"{stack.http}/v1/jobs", json=BODY, headers=auth(stack.key)) as resp:
        assert resp.status == 200, await resp.text()
        job: dict[str, Any] = await resp.json()
    return job


async def test_redis_restart_ends_watches_with_unavailable_and_they_resume(private: Private) -> None:
    stack = private
    metadata = (("authorization", f"Bearer {stack.key}"),)
    async with aiohttp.ClientSession() as http, grpc.aio.insecure_channel(stack.grpc) as channel:
        stub = pb_grpc.JobServiceStub(channel)
        job = await _create(http, stack)
        grpc_watch = stub.WatchJob(pb.WatchJobRequest(name=job["name"]), metadata=metadata)
        first = await grpc_watch.read()
        assert isinstance(first, pb.WatchJobResponse)
        assert first.job.state == first.job.STATE_QUEUED
        sse = await http.get(f"{stack.http}/v1/{job['name']}:watch", headers=auth(stack.key))
        sse_stream = sse_events(sse)
        sse_first = await anext(sse_stream)
        assert sse_first[2]["job"]["state"] == "STATE_QUEUED"

        stack.redis_server.stop()
        # Both watches end, within a bound, with UNAVAILABLE: STORAGE_UNAVAILABLE.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(grpc_watch.read(), OUTAGE_BOUND_S)
        assert _grpc_error(caught.value) == (grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE")
        rest = [event async for event in sse_stream]
        assert [(event, _rest_reason(data)) for _, event, data in rest] == [
            ("error", ("UNAVAILABLE", "STORAGE_UNAVAILABLE"))
        ]
        sse.release()
        # A call during the outage: 503 / UNAVAILABLE, STORAGE_UNAVAILABLE, with a retry delay.
        async with http.get(f"{stack.http}/v1/{job['name']}", headers=auth(stack.key)) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "1"
            assert _rest_reason(await resp.json()) == ("UNAVAILABLE", "STORAGE_UNAVAILABLE")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetJob(pb.GetJobRequest(name=job["name"]), metadata=metadata)
        assert _grpc_error(caught.value) == (grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE")

        stack.redis_server.start()
        # No manual step: the first calls after the restart work, and the job outlived it (AOF).
        again = await _create(http, stack)
        assert again["state"] == "STATE_QUEUED"
        resumed_grpc = stub.WatchJob(
            pb.WatchJobRequest(name=job["name"], after_event_id=first.event_id), metadata=metadata
        )
        headers = {**auth(stack.key), "Last-Event-ID": sse_first[0]}
        # Its headers come with its first event, which only the cancel below makes.
        resuming_sse = asyncio.ensure_future(
            http.get(f"{stack.http}/v1/{job['name']}:watch", headers=headers)
        )
        async with http.post(
            f"{stack.http}/v1/{job['name']}:cancel", json={}, headers=auth(stack.key)
        ) as resp:
            assert resp.status == 200
        async with await resuming_sse as resumed_sse:
            assert resumed_sse.status == 200, await resumed_sse.text()
            sse_rest = [(event, data["job"]["state"]) async for _, event, data in sse_events(resumed_sse)]
        grpc_rest = [event.job.state async for event in resumed_grpc]
    assert sse_rest == [("message", "STATE_CANCELLED")]
    assert grpc_rest == [first.job.STATE_CANCELLED]
    # The scheduler's pub/sub listener is back on the restarted Redis by itself.
    redis = Redis.from_url(stack.redis_server.url)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + OUTAGE_BOUND_S
        while (await redis.pubsub_numsub(keys.CANCEL_CHANNEL))[0][1] != 1:
            assert loop.time() < deadline, "the scheduler did not resubscribe"
            await asyncio.sleep(0.05)
    finally:
        await redis.aclose()


async def test_scheduler_restart_is_unavailable_then_found_again(private: Private) -> None:
    stack = private
    metadata = (("authorization", f"Bearer {stack.key}"),)
    async with aiohttp.ClientSession() as http, grpc.aio.insecure_channel(stack.grpc) as channel:
        stub = pb_grpc.JobServiceStub(channel)
        job = await _create(http, stack)
        watch = stub.WatchJob(pb.WatchJobRequest(name=job["name"]), metadata=metadata)
        first = await watch.read()
        assert isinstance(first, pb.WatchJobResponse)

        # A graceful stop leaves open streams up to its grace period, then cuts them.
        stopping = asyncio.create_task(stack.scheduler.stop())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(watch.read(), SCHEDULER_GRACE_BOUND_S)
        assert _grpc_error(caught.value) == (grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE")
        await stopping
        async with http.get(f"{stack.http}/v1/{job['name']}", headers=auth(stack.key)) as resp:
            assert resp.status == 503
            assert _rest_reason(await resp.json()) == ("UNAVAILABLE", "UPSTREAM_UNAVAILABLE")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateJob(pb.CreateJobRequest(job=first.job), metadata=metadata)
        assert _grpc_error(caught.value) == (grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE")

        stack.scheduler = SchedulerApp(stack.scheduler_settings)
        await stack.scheduler.start()
        # The gateway's channel finds it again by itself, within its capped reconnect backoff.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + OUTAGE_BOUND_S
        while True:
            async with http.get(f"{stack.http}/v1/{job['name']}", headers=auth(stack.key)) as resp:
                if resp.status == 200:
                    break
                assert resp.status == 503
                assert _rest_reason(await resp.json()) == ("UNAVAILABLE", "UPSTREAM_UNAVAILABLE")
            assert loop.time() < deadline, "the gateway did not reconnect to the scheduler"
            await asyncio.sleep(0.1)
        resumed = stub.WatchJob(
            pb.WatchJobRequest(name=job["name"], after_event_id=first.event_id), metadata=metadata
        )
        async with http.post(
            f"{stack.http}/v1/{job['name']}:cancel", json={}, headers=auth(stack.key)
        ) as resp:
            assert resp.status == 200
        assert [event.job.state async for event in resumed] == [first.job.STATE_CANCELLED]
