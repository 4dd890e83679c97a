"""SIGTERM drains a gateway process: health turns NOT_SERVING, new calls are refused with
UNAVAILABLE / 503, calls in flight finish, watches end so that clients reattach elsewhere, and no
accepted job is lost: every job in Redis is one a client was given, and each one runs to the end."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from kiln.v1 import job_pb2
from kiln.v1 import job_service_pb2 as pb
from kiln.v1 import job_service_pb2_grpc as pb_grpc
from redis.asyncio import Redis

from libs import redis_keys as keys
from libs.api_keys import ApiKeys
from libs.redis_server import RedisServer, free_port
from tests.helpers import auth, rest_wait, sse_events

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

GRACE_S = 10
BURST = 20  # CreateJob calls in flight at the SIGTERM: half REST, half gRPC
CONFIG = """
worker_slots = 2
[models.unserved]
source = "/nonexistent"
size_multiple = 16
default_size = 64
default_steps = 4
"""
BODY = {"model": "tiny-sd", "textToImage": {"prompt": "drain", "seed": "5"}}


@dataclass
class Proc:
    proc: asyncio.subprocess.Process
    ready: dict[str, int]


@dataclass
class Suite:
    redis_url: str
    gateway_a: Proc
    gateway_b: Proc
    key: str  # tenant "drain": the jobs counted
    watcher_key: str  # tenant "watcher": a job that waits, to be watched
    procs: list[Proc] = field(default_factory=list)

    def http(self, gateway: Proc) -> str:
        return f"http://127.0.0.1:{gateway.ready['http']}"

    def grpc(self, gateway: Proc) -> str:
        return f"127.0.0.1:{gateway.ready['grpc']}"


async def _launch(module: str, env: dict[str, str], log: Path) -> Proc:
    with log.open("wb") as stderr:  # the child has its own copy of the descriptor
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, env=env, stdout=asyncio.subprocess.PIPE, stderr=stderr
        )
    assert proc.stdout is not None
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=120)).decode()
        assert line, f"{module} exited with {await proc.wait()}; see {log}"
        if line.startswith("KILN_READY"):
            ports = dict(part.split("=") for part in line.split()[2:])
            return Proc(proc, {name: int(value) for name, value in ports.items()})


@pytest.fixture
async def suite(tmp_path: Path, repo_root: Path) -> AsyncIterator[Suite]:
    redis_server = RedisServer(tmp_path / "redis", appendonly=False)
    redis_server.start()
    (tmp_path / "kiln.toml").write_text(CONFIG)
    scheduler_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env |= {
        "PYTHONPATH": str(repo_root),
        "KILN_CONFIG": str(tmp_path / "kiln.toml"),
        "KILN_REDIS_URL": redis_server.url,
        "KILN_SCHEDULER_PORT": str(scheduler_port),
        "KILN_SCHEDULER_ADDRESS": f"127.0.0.1:{scheduler_port}",
        "KILN_GATEWAY_GRPC_PORT": "0",
        "KILN_GATEWAY_HTTP_PORT": "0",
        "KILN_SHUTDOWN_GRACE_SECONDS": str(GRACE_S),
    }
    procs: list[Proc] = []
    try:
        for name, module in (
            ("scheduler", "services.scheduler"),
            ("worker", "services.gpu_worker"),
            ("gateway-a", "services.gateway"),
            ("gateway-b", "services.gateway"),
        ):
            procs.append(await _launch(module, env, tmp_path / f"{name}.log"))
        redis = Redis.from_url(redis_server.url)
        api_keys = ApiKeys(redis)
        key, watcher_key = await api_keys.create("drain", "enterprise"), await api_keys.create("watcher")
        await redis.aclose()
        yield Suite(redis_server.url, procs[2], procs[3], key, watcher_key, procs)
    finally:
        for running in reversed(procs):
            if running.proc.returncode is None:
                running.proc.terminate()
                try:
                    await asyncio.wait_for(running.proc.wait(), 30)
                except TimeoutError:
                    running.proc.kill()
                    await running.proc.wait()
        redis_server.stop()


def _reason(exc: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(exc)
    info = error_details_pb2.ErrorInfo()
    assert status is not None and status.details[0].Unpack(info)
    return str(info.reason)


def _rest_reason(body: dict[str, Any]) -> tuple[str, str]:
    info = next(d for d in body["error"]["details"] if d["@type"].endswith("ErrorInfo"))
    return body["error"]["status"], info["reason"]


async def _rest_create(base: str, key: str) -> str | None:
    """The job's name, or None for a refusal that says to retry (503, or no listener at all)."""
    connector = aiohttp.TCPConnector(force_close=True)
    try:
        async with (
            aiohttp.ClientSession(connector=connector) as http,
            http.post(f"{base}/v1/jobs", json=BODY, headers=auth(key)) as resp,
        ):
            body = await resp.json()
            if resp.status == 503:
                assert _rest_reason(body) == ("UNAVAILABLE", "SHUTTING_DOWN")
                assert resp.headers["Retry-After"] == "1"
                return None
            assert resp.status == 200, body
            return str(body["name"])
    except aiohttp.ClientConnectorError:  # the listener had closed: nothing reached the gateway
        return None


async def _grpc_create(stub: pb_grpc.JobServiceStub, key: str) -> str | None:
    job = job_pb2.Job(model="tiny-sd", text_to_image=job_pb2.TextToImage(prompt="drain", seed=5))
    try:
        reply = await stub.CreateJob(
            pb.CreateJobRequest(job=job), metadata=(("authorization", f"Bearer {key}"),)
        )
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
        return None
    return reply.job.name


async def _slow_post(port: int, key: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A CreateJob whose body is still on its way: in flight until the rest is sent."""
    body = json.dumps(BODY).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        (
            f"POST /v1/jobs HTTP/1.1\r\nHost: kiln\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body[:10]
    )
    await writer.drain()
    return reader, writer, body[10:]


async def test_sigterm_drains_the_gateway_and_loses_no_job(suite: Suite) -> None:
    a, b = suite.gateway_a, suite.gateway_b
    watcher_metadata = (("authorization", f"Bearer {suite.watcher_key}"),)
    async with (
        aiohttp.ClientSession() as http,
        grpc.aio.insecure_channel(suite.grpc(a)) as channel_a,
        grpc.aio.insecure_channel(suite.grpc(b)) as channel_b,
    ):
        stub_a, stub_b = pb_grpc.JobServiceStub(channel_a), pb_grpc.JobServiceStub(channel_b)
        # Open before the SIGTERM: a health watch, and two watches of a job that waits.
        health = health_pb2_grpc.HealthStub(channel_a).Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await health.read()).status == health_pb2.HealthCheckResponse.SERVING
        waiting = json.loads(
            await (
                await http.post(
                    f"{suite.http(a)}/v1/jobs",
                    json={"model": "unserved", "textToImage": {"prompt": "waits"}},
                    headers=auth(suite.watcher_key),
                )
            ).text()
        )
        grpc_watch = stub_a.WatchJob(pb.WatchJobRequest(name=waiting["name"]), metadata=watcher_metadata)
        grpc_first = await grpc_watch.read()
        assert isinstance(grpc_first, pb.WatchJobResponse)
        sse = await http.get(f"{suite.http(a)}/v1/{waiting['name']}:watch", headers=auth(suite.watcher_key))
        sse_stream = sse_events(sse)
        sse_first_id, _, _ = await anext(sse_stream)

        reader, writer, rest_of_body = await _slow_post(a.ready["http"], suite.key)
        # One round trip after it, so that the gateway has surely begun to handle it.
        async with http.get(f"{suite.http(a)}/v1/{waiting['name']}", headers=auth(suite.watcher_key)) as resp:
            assert resp.status == 200

        burst = [asyncio.ensure_future(_rest_create(suite.http(a), suite.key)) for _ in range(BURST // 2)]
        burst += [asyncio.ensure_future(_grpc_create(stub_a, suite.key)) for _ in range(BURST // 2)]
        await asyncio.wait(burst, return_when=asyncio.FIRST_COMPLETED)
        a.proc.send_signal(signal.SIGTERM)

        # Health turns first; the watches end at once with UNAVAILABLE, SHUTTING_DOWN.
        status = await asyncio.wait_for(health.read(), 5)
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        health.cancel()  # a health watch is a call in flight too: it would hold the drain to its grace
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(grpc_watch.read(), 5)
        assert (caught.value.code(), _reason(caught.value)) == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")
        ended = await asyncio.wait_for(_collect(sse_stream), 5)
        assert [(event, _rest_reason(data)) for event, data in ended] == [
            ("error", ("UNAVAILABLE", "SHUTTING_DOWN"))
        ]
        sse.release()

        # New work is refused while the slow request holds the drain open.
        assert await _rest_create(suite.http(a), suite.key) is None
        async with grpc.aio.insecure_channel(suite.grpc(a)) as fresh:
            assert await _grpc_create(pb_grpc.JobServiceStub(fresh), suite.key) is None

        # Every call of the burst has its answer: a job, or UNAVAILABLE / 503; none hangs.
        outcomes = await asyncio.wait_for(asyncio.gather(*burst), GRACE_S + 5)
        received = {name for name in outcomes if name is not None}

        # The call in flight at the SIGTERM gets its job.
        writer.write(rest_of_body)
        await writer.drain()
        head, _, slow_body = (await asyncio.wait_for(reader.read(), GRACE_S + 5)).partition(b"\r\n\r\n")
        writer.close()
        assert head.startswith(b"HTTP/1.1 200"), head
        received.add(json.loads(slow_body)["name"])
        assert await asyncio.wait_for(a.proc.wait(), GRACE_S + 10) == 0

        # The watchers reattach to the other gateway from their last event ids and see the end.
        resumed = stub_b.WatchJob(
            pb.WatchJobRequest(name=waiting["name"], after_event_id=grpc_first.event_id),
            metadata=watcher_metadata,
        )
        sse_headers = {**auth(suite.watcher_key), "Last-Event-ID": sse_first_id}
        resumed_sse = asyncio.ensure_future(
            http.get(f"{suite.http(b)}/v1/{waiting['name']}:watch", headers=sse_headers)
        )
        async with http.post(
            f"{suite.http(b)}/v1/{waiting['name']}:cancel", json={}, headers=auth(suite.watcher_key)
        ) as resp:
            assert resp.status == 200
        async with await resumed_sse as resp:
            assert [data["job"]["state"] async for _, _, data in sse_events(resp)] == ["STATE_CANCELLED"]
        assert [event.job.state async for event in resumed] == [job_pb2.Job.STATE_CANCELLED]

        # No job is orphaned: the tenant's jobs are exactly those the clients were given ...
        redis = Redis.from_url(suite.redis_url)
        try:
            raw_ids = cast(list[bytes], await redis.zrange(keys.tenant_jobs("drain"), 0, -1))
            indexed = {f"jobs/{raw.decode()}" for raw in raw_ids}
        finally:
            await redis.aclose()
        assert indexed == received
        assert len(received) == 1 + sum(name is not None for name in outcomes)
        # ... and every one of them runs to the end.
        for name in sorted(received):
            job = await rest_wait(http, suite.http(b), suite.key, name, timeout_s=60)
            assert job["state"] == "STATE_SUCCEEDED", job


async def _collect(
    stream: AsyncIterator[tuple[str, str, dict[str, Any]]],
) -> list[tuple[str, dict[str, Any]]]:
    return [(event, data) async for _, event, data in stream]
