"""Edge cases found by trying to break the API: each must end in a clear 4xx or the right state."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import grpc
import pytest
from kiln.v1 import job_pb2
from kiln.v1 import job_service_pb2 as pb
from kiln.v1 import job_service_pb2_grpc as pb_grpc
from redis.asyncio import Redis

from libs.jobs import Artifact, Route, State, TextToImage
from libs.sdk.client import KilnClient
from libs.tiers import DEFAULT_TIERS
from services.scheduler.admission import terms
from services.scheduler.scripts import Scripts
from services.scheduler.store import JobStore
from tests.conftest import Stack
from tests.helpers import auth, rest_wait, sse_events

pytestmark = pytest.mark.timeout(60)


async def _post(stack: Stack, body: bytes | dict[str, Any], query: str = "") -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        kwargs: dict[str, Any] = {"json": body} if isinstance(body, dict) else {"data": body}
        async with http.post(
            f"{stack.http_base}/v1/jobs{query}", headers=auth(stack.key_a), **kwargs
        ) as resp:
            return resp.status, await resp.json()


def _violation(body: dict[str, Any]) -> dict[str, str]:
    bad = next(d for d in body["error"]["details"] if d["@type"].endswith("BadRequest"))
    [violation] = bad["fieldViolations"]
    return dict(violation)


async def test_watching_a_queued_job_outlasts_the_redis_socket_timeout(stack: Stack) -> None:
    """The stack's scheduler has a 1 s Redis socket timeout; the watch waits 2.5 s, then ends."""
    async with KilnClient(stack.grpc_target, stack.key_a) as client:
        job = await client.create_job(
            job_pb2.Job(model="unserved", text_to_image=job_pb2.TextToImage(prompt="waits"))
        )
        events = client.watch(job.name)
        first = await anext(events)
        assert first.job.state == job_pb2.Job.STATE_QUEUED
        pending = asyncio.ensure_future(anext(events))
        done, _ = await asyncio.wait([pending], timeout=2.5)
        assert not done  # still waiting, no error
        await client.cancel_job(job.name)
        last = await pending
        assert last.job.state == job_pb2.Job.STATE_CANCELLED
        with pytest.raises(StopAsyncIteration):
            await anext(events)


async def test_resuming_after_the_last_event_ends_at_once(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        body = {"model": "tiny-sd", "textToImage": {"prompt": "done", "seed": "1"}}
        async with http.post(f"{stack.http_base}/v1/jobs", json=body, headers=auth(stack.key_a)) as resp:
            name = (await resp.json())["name"]
        await rest_wait(http, stack.http_base, stack.key_a, name)
        url = f"{stack.http_base}/v1/{name}:watch"
        async with http.get(url, headers=auth(stack.key_a)) as resp:
            events = [e async for e in sse_events(resp)]
        headers = {**auth(stack.key_a), "Last-Event-ID": events[-1][0]}
        async with http.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=5)) as resp:
            assert resp.status == 200
            assert [e async for e in sse_events(resp)] == []
        for bad in ("99999999999999999999-0", "abc", "1-0\u00e9"):
            headers = {**auth(stack.key_a), "Last-Event-ID": bad}
            async with http.get(url, headers=headers) as resp:
                assert resp.status == 400, bad
                assert _violation(await resp.json())["field"] == "after_event_id"


async def test_request_id_retry_without_a_seed_returns_the_same_job(stack: Stack) -> None:
    body = {"model": "tiny-sd", "textToImage": {"prompt": "idempotent"}}
    statuses_and_jobs = await asyncio.gather(*(_post(stack, body, "?requestId=retry-1") for _ in range(5)))
    assert {status for status, _ in statuses_and_jobs} == {200}
    assert len({job["name"] for _, job in statuses_and_jobs}) == 1
    status, error = await _post(stack, {**body, "textToImage": {"prompt": "other"}}, "?requestId=retry-1")
    assert status == 422
    assert error["error"]["details"][0]["reason"] == "REQUEST_ID_REUSED"
    status, error = await _post(stack, body, "?requestId=has%20space")
    assert status == 400
    assert _violation(error)["field"] == "request_id"


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        (
            b'{"model": "tiny-sd", "textToImage": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            "job",
            "INVALID_JSON",
        ),
        (
            b'{"model": "tiny-sd", "textToImage": {"prompt": "x", "width": 1' + b"0" * 5000 + b"}}",
            "job",
            "INVALID_JSON",
        ),
        (b'{"model": "tiny-sd", "textToImage": {"prompt": "a"}, "\\ud800": 1}', "job", "INVALID_FIELD"),
        (
            b'{"model": "tiny-sd", "textToImage": {"prompt": "a\\ud800b"}}',
            "job.text_to_image.prompt",
            "INVALID_FIELD",
        ),
        (
            b'{"model": "tiny-sd", "textToImage": {"prompt": "\\u200b\\u200d\\u0301"}}',
            "job.text_to_image.prompt",
            "INVALID_FIELD",
        ),
    ],
    ids=["deep-nesting", "huge-integer", "surrogate-key", "surrogate-value", "invisible-prompt"],
)
async def test_malformed_bodies_are_400_not_500(stack: Stack, raw: bytes, field: str, reason: str) -> None:
    status, body = await _post(stack, raw)
    assert status == 400, body
    assert body["error"]["details"][0]["reason"] == reason
    assert _violation(body)["field"] == field


async def test_bad_page_tokens_names_and_huge_numbers_in_urls_are_400(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        for path, field in (
            ("/v1/jobs?pageToken=zzzz", "page_token"),
            ("/v1/jobs?pageSize=1" + "0" * 5000, "page_size"),
            ("/v1/jobs/01m8y0vm6w4w14c1j0xv06285r/artifacts/00:read", "name"),
        ):
            async with http.get(stack.http_base + path, headers=auth(stack.key_a)) as resp:
                assert resp.status == 400, path
                assert _violation(await resp.json())["field"] == field


async def test_two_authorization_entries_on_grpc_are_refused(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        metadata = (("authorization", "Bearer nope"), ("authorization", f"Bearer {stack.key_a}"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.JobServiceStub(channel).ListJobs(pb.ListJobsRequest(), metadata=metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "exactly one authorization" in (err.value.details() or "")


async def test_malformed_header_is_refused_without_logging_the_key(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    host, port = stack.http_base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {stack.key_a}\x00\r\n\r\n".encode()
    )
    await writer.drain()
    with caplog.at_level(logging.INFO):
        status_line = await reader.readline()
        writer.close()
        await writer.wait_closed()
    assert status_line.split()[1] == b"400"
    assert stack.key_a not in caplog.text
    assert "rejected a malformed HTTP request: BadHttpMessage (HTTP 400)" in caplog.text


async def test_a_cancel_accepted_while_running_wins_over_a_late_success(stack: Stack) -> None:
    """The worker may finish the last step after the cancel was accepted: the job still ends CANCELLED."""
    redis = Redis.from_url(stack.redis_url)
    store = JobStore(redis, Scripts(redis), job_ttl_s=60, artifact_ttl_s=60)
    try:
        spec = TextToImage("p", "", 64, 64, 4, 7.5, 1, 1)
        record, _ = await store.create("tenant-race", "tiny-sd", spec, terms("pro", DEFAULT_TIERS["pro"], 1))
        assert (await store.start("tenant-race", record.id, 1, "w", Route.STANDARD)).ok
        after_cancel, running = await store.cancel("tenant-race", record.id)
        assert running and after_cancel.state is State.RUNNING and after_cancel.cancel_requested
        image = Artifact(0, "image/png", 3, "00", 1, 64, 64)
        outcome = await store.succeed("tenant-race", record.id, 1, [(image, b"png")])
        assert outcome.ok
        final = await store.get("tenant-race", record.id)
        assert final.state is State.CANCELLED
        assert final.artifacts == ()
        assert await redis.exists(f"kiln:{{t:tenant-race}}:job:{record.id}:artifact:0") == 0
    finally:
        await redis.aclose()
