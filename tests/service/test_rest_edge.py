"""The REST edge on a real aiohttp server (port 0), over an in-memory stand-in for the layer below it."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from google.api import httpbody_pb2
from kiln.v1 import job_pb2, job_service_pb2

from libs.errors import NotFound, ResourceExhausted, Unauthenticated, Unavailable
from services.gateway.openapi import build_openapi
from services.gateway.rest import build_rest_app

JOB_SERVICE = job_service_pb2.DESCRIPTOR.services_by_name["JobService"]
AUTH = {"Authorization": "Bearer good-key"}


class MemoryJobs:
    """JobService methods over a dict. Special names and models drive the failure cases."""

    def __init__(self) -> None:
        self.jobs: dict[str, job_pb2.Job] = {}
        self.ids = itertools.count(1)
        self.calls: list[tuple[str, object, Any]] = []
        self.watch_closed = asyncio.Event()

    async def CreateJob(self, principal: str, request: job_service_pb2.CreateJobRequest) -> Any:
        self.calls.append(("CreateJob", principal, request))
        if request.job.model.startswith("busy:"):
            raise ResourceExhausted("too many jobs", retry_after_s=float(request.job.model.split(":")[1]))
        if request.job.model == "crash":
            raise RuntimeError("secret internal detail")
        job = job_pb2.Job()
        job.CopyFrom(request.job)
        job.name, job.state = f"jobs/{next(self.ids)}", job_pb2.Job.STATE_QUEUED
        self.jobs[job.name] = job
        return job_service_pb2.CreateJobResponse(job=job)

    async def EstimateJob(self, principal: str, request: job_service_pb2.EstimateJobRequest) -> Any:
        self.calls.append(("EstimateJob", principal, request))
        return job_service_pb2.EstimateJobResponse(cost_units=1, admissible_now=True)

    def _job(self, name: str) -> job_pb2.Job:
        if name not in self.jobs:
            raise NotFound(f"{name} not found", reason="JOB_NOT_FOUND")
        return self.jobs[name]

    async def GetJob(self, principal: str, request: job_service_pb2.GetJobRequest) -> Any:
        return job_service_pb2.GetJobResponse(job=self._job(request.name))

    async def ListJobs(self, principal: str, request: job_service_pb2.ListJobsRequest) -> Any:
        self.calls.append(("ListJobs", principal, request))
        jobs = list(self.jobs.values())[: request.page_size]
        return job_service_pb2.ListJobsResponse(jobs=jobs, next_page_token="next")

    async def CancelJob(self, principal: str, request: job_service_pb2.CancelJobRequest) -> Any:
        job = self._job(request.name)
        job.state = job_pb2.Job.STATE_CANCELLED
        return job_service_pb2.CancelJobResponse(job=job)

    async def WatchJob(
        self, principal: str, request: job_service_pb2.WatchJobRequest
    ) -> AsyncIterator[job_service_pb2.WatchJobResponse]:
        self.calls.append(("WatchJob", principal, request))
        try:
            if request.name == "jobs/endless":
                yield job_service_pb2.WatchJobResponse(event_id="1-0", job=job_pb2.Job(name=request.name))
                await asyncio.sleep(3600)
            job = self._job(request.name)
            states = [job_pb2.Job.STATE_QUEUED, job_pb2.Job.STATE_RUNNING, job_pb2.Job.STATE_SUCCEEDED]
            for i, state in enumerate(states, start=1):
                if request.after_event_id and i <= int(request.after_event_id.split("-")[0]):
                    continue
                yield job_service_pb2.WatchJobResponse(
                    event_id=f"{i}-0", job=job_pb2.Job(name=job.name, state=state)
                )
                if job.model == "flaky":
                    raise Unavailable("scheduler went away", retry_after_s=0.5)
        finally:
            self.watch_closed.set()

    async def ReadArtifact(
        self, principal: str, request: job_service_pb2.ReadArtifactRequest
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        job = self._job(request.name.rsplit("/artifacts/", 1)[0])
        yield httpbody_pb2.HttpBody(content_type="image/png", data=b"\x89PNG\r\n")
        if job.model == "flaky":
            raise RuntimeError("disk gone")
        yield httpbody_pb2.HttpBody(data=b"rest of the image")


async def authenticate(authorization: str | None) -> str:
    if authorization != AUTH["Authorization"]:
        raise Unauthenticated("API key not valid", reason="API_KEY_INVALID")
    return "tenant-a"


class Edge:
    def __init__(self, api: MemoryJobs, base: str, session: aiohttp.ClientSession) -> None:
        self.api, self.base, self.session = api, base, session

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, dict[str, str], Any]:
        headers = {**AUTH, **kwargs.pop("headers", {})}
        async with self.session.request(method, self.base + path, headers=headers, **kwargs) as response:
            body = await response.read()
            parsed = json.loads(body) if response.content_type == "application/json" else body
            return response.status, dict(response.headers), parsed

    async def create(self, job: dict[str, Any]) -> dict[str, Any]:
        status, _, body = await self.call("POST", "/v1/jobs", json=job)
        assert status == 200, body
        return dict(body)


StartEdge = Callable[..., Awaitable[Edge]]


@pytest.fixture
async def start_edge() -> AsyncIterator[StartEdge]:
    runners: list[web.AppRunner] = []
    sessions: list[aiohttp.ClientSession] = []

    async def start(**options: Any) -> Edge:
        api = MemoryJobs()
        openapi = build_openapi(JOB_SERVICE, title="Kiln API", version="v1")
        runner = web.AppRunner(build_rest_app(JOB_SERVICE, api, authenticate, openapi, **options))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        sessions.append(aiohttp.ClientSession())
        host, port = runner.addresses[0][:2]
        return Edge(api, f"http://{host}:{port}", sessions[-1])

    yield start
    for session in sessions:
        await session.close()
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def edge(start_edge: StartEdge) -> Edge:
    return await start_edge()


def sse_events(text: str) -> list[dict[str, str]]:
    events = []
    for block in text.split("\n\n"):
        if block:
            events.append(dict(line.split(": ", 1) for line in block.split("\n")))
    return events


def violations(body: dict[str, Any]) -> list[dict[str, str]]:
    [bad_request] = [d for d in body["error"]["details"] if d["@type"].endswith("google.rpc.BadRequest")]
    return list(bad_request["fieldViolations"])


def reason(body: dict[str, Any]) -> str:
    [info] = [d for d in body["error"]["details"] if d["@type"].endswith("google.rpc.ErrorInfo")]
    return str(info["reason"])


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_create_then_get_a_job(edge: Edge) -> None:
    seed = "9007199254740993"  # 2**53 + 1: a JSON number would lose the last digit
    text_to_image = {"prompt": "a cat", "width": 512, "seed": seed}
    create = {"model": "tiny-sd", "textToImage": text_to_image}
    status, headers, job = await edge.call("POST", "/v1/jobs", json=create)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert job == {
        "name": "jobs/1",
        "model": "tiny-sd",
        "state": "STATE_QUEUED",
        "textToImage": {"prompt": "a cat", "width": 512, "seed": seed},
    }
    [(_, principal, request)] = edge.api.calls
    assert principal == "tenant-a" and request.job.text_to_image.seed == 2**53 + 1

    status, _, fetched = await edge.call("GET", "/v1/jobs/1")
    assert (status, fetched) == (200, job)
    status, _, missing = await edge.call("GET", "/v1/jobs/404")
    assert status == 404 and missing["error"]["status"] == "NOT_FOUND" and reason(missing) == "JOB_NOT_FOUND"


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_original_snake_case_names_are_accepted(edge: Edge) -> None:
    job = await edge.create({"model": "m", "text_to_image": {"prompt": "p", "negative_prompt": "blur"}})
    assert job["textToImage"] == {"prompt": "p", "negativePrompt": "blur"}


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_list_jobs_from_query_parameters(edge: Edge) -> None:
    for _ in range(3):
        await edge.create({"model": "m"})
    status, _, page = await edge.call("GET", "/v1/jobs?pageSize=2&pageToken=x")
    assert status == 200
    assert [job["name"] for job in page["jobs"]] == ["jobs/1", "jobs/2"] and page["nextPageToken"] == "next"
    request = edge.api.calls[-1][2]
    assert (request.page_size, request.page_token) == (2, "x")


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_cancel_with_and_without_a_body(edge: Edge) -> None:
    await edge.create({"model": "m"})
    status, _, job = await edge.call("POST", "/v1/jobs/1:cancel")
    assert status == 200 and job["state"] == "STATE_CANCELLED"
    status, _, job = await edge.call("POST", "/v1/jobs/1:cancel", json={})
    assert status == 200 and job["name"] == "jobs/1"


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_watch_streams_server_sent_events_and_resumes(edge: Edge) -> None:
    await edge.create({"model": "m"})
    async with edge.session.get(edge.base + "/v1/jobs/1:watch", headers=AUTH) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        assert response.headers["Cache-Control"] == "no-cache"
        text = await response.text()
    events = sse_events(text)
    assert [(e["id"], e["event"]) for e in events] == [(f"{i}-0", "message") for i in (1, 2, 3)]
    first = {"eventId": "1-0", "job": {"name": "jobs/1", "state": "STATE_QUEUED"}}
    assert json.loads(events[0]["data"]) == first
    assert ',"' in events[0]["data"] and ", " not in events[0]["data"]  # compact JSON on one line

    resumed = {**AUTH, "Last-Event-ID": "2-0"}
    async with edge.session.get(edge.base + "/v1/jobs/1:watch", headers=resumed) as response:
        assert [e["id"] for e in sse_events(await response.text())] == ["3-0"]
    # An explicit after_event_id wins over the header.
    async with edge.session.get(edge.base + "/v1/jobs/1:watch?afterEventId=1-0", headers=resumed) as response:
        assert [e["id"] for e in sse_events(await response.text())] == ["2-0", "3-0"]


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_watch_errors_before_and_after_the_first_event(edge: Edge) -> None:
    status, headers, body = await edge.call("GET", "/v1/jobs/9:watch")
    assert status == 404 and headers["Content-Type"].startswith("application/json")
    assert body["error"]["status"] == "NOT_FOUND"

    await edge.create({"model": "flaky"})
    async with edge.session.get(edge.base + "/v1/jobs/1:watch", headers=AUTH) as response:
        assert response.status == 200
        events = sse_events(await response.text())
    assert [e["event"] for e in events] == ["message", "error"]
    error = json.loads(events[1]["data"])["error"]
    assert (error["code"], error["status"], error["message"]) == (503, "UNAVAILABLE", "scheduler went away")


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_a_client_that_leaves_closes_the_stream(edge: Edge, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with edge.session.get(edge.base + "/v1/jobs/endless:watch", headers=AUTH) as response:
        assert (await response.content.readline()).startswith(b"id: 1-0")
        response.close()
    await asyncio.wait_for(edge.api.watch_closed.wait(), timeout=10)
    await asyncio.sleep(0.1)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_read_artifact_streams_raw_bytes(edge: Edge) -> None:
    await edge.create({"model": "m"})
    status, headers, body = await edge.call("GET", "/v1/jobs/1/artifacts/0:read")
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert body == b"\x89PNG\r\nrest of the image"

    status, _, missing = await edge.call("GET", "/v1/jobs/7/artifacts/0:read")
    assert status == 404 and missing["error"]["status"] == "NOT_FOUND"

    await edge.create({"model": "flaky"})
    with pytest.raises(aiohttp.ClientPayloadError):  # cut short, so the client cannot take it as whole
        await edge.call("GET", "/v1/jobs/2/artifacts/0:read")


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_unauthenticated_requests_never_reach_the_api(edge: Edge) -> None:
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
        status, _, body = await edge.call("POST", "/v1/jobs", json={"model": "m"}, headers=headers)
        assert status == 401 and body["error"]["status"] == "UNAUTHENTICATED"
    assert edge.api.calls == []


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_unknown_paths_and_wrong_verbs(edge: Edge) -> None:
    status, _, body = await edge.call("GET", "/v2/nothing")
    assert status == 404 and body["error"]["status"] == "NOT_FOUND" and reason(body) == "ROUTE_NOT_FOUND"
    status, headers, body = await edge.call("DELETE", "/v1/jobs")
    assert status == 405 and headers["Allow"] == "GET, POST" and reason(body) == "METHOD_NOT_ALLOWED"
    status, headers, _ = await edge.call("GET", "/v1/jobs/1:cancel")
    assert status == 405 and headers["Allow"] == "POST"


@pytest.mark.asyncio
@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("body", "field", "description"),
    [
        (
            b'{"model": "m", "textToImage": {"width": "512"}}',
            "job.text_to_image.width",
            'must be an integer (JSON number), got string "512"',
        ),
        (b'{"model": "m", "colour": "red"}', "job.colour", "unknown field of kiln.v1.Job"),
        (
            b'{"model": "m"',
            "job",
            "request body is not valid JSON: Expecting ',' delimiter at line 1 column 14",
        ),
    ],
)
async def test_bad_json_is_a_400_naming_the_field(
    edge: Edge, body: bytes, field: str, description: str
) -> None:
    headers = {"Content-Type": "application/json"}
    status, _, error = await edge.call("POST", "/v1/jobs", data=body, headers=headers)
    assert status == 400 and error["error"]["status"] == "INVALID_ARGUMENT"
    assert violations(error) == [{"field": field, "description": description}]
    assert edge.api.calls == []


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_oversized_bodies_are_a_413(start_edge: StartEdge) -> None:
    edge = await start_edge(max_body_bytes=1024)
    big = json.dumps({"model": "m", "textToImage": {"prompt": "x" * 2000}}).encode()
    status, _, body = await edge.call("POST", "/v1/jobs", data=big)
    assert status == 413 and reason(body) == "REQUEST_TOO_LARGE"
    assert body["error"]["message"] == "request body exceeds the limit of 1024 bytes"

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length to check up front
        for i in range(0, len(big), 256):
            yield big[i : i + 256]

    status, _, body = await edge.call("POST", "/v1/jobs", data=chunked())
    assert status == 413 and reason(body) == "REQUEST_TOO_LARGE"
    assert (await edge.call("POST", "/v1/jobs", json={"model": "m"}))[0] == 200


@pytest.mark.asyncio
@pytest.mark.timeout(30)
@pytest.mark.parametrize(("delay", "header"), [("1.2", "2"), ("0.2", "1"), ("3", "3")])
async def test_retry_after_is_whole_seconds_rounded_up(edge: Edge, delay: str, header: str) -> None:
    status, headers, body = await edge.call("POST", "/v1/jobs", json={"model": f"busy:{delay}"})
    assert status == 429 and headers["Retry-After"] == header
    assert body["error"]["status"] == "RESOURCE_EXHAUSTED"


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_unexpected_errors_are_a_generic_500(edge: Edge, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.CRITICAL, logger="libs.rpc_status"):  # logged in full there, on purpose
        status, _, body = await edge.call("POST", "/v1/jobs", json={"model": "crash"})
    assert status == 500 and body["error"]["status"] == "INTERNAL"
    assert "secret" not in json.dumps(body)


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_openapi_document_needs_no_key(edge: Edge) -> None:
    async with edge.session.get(edge.base + "/openapi.json") as response:
        assert response.status == 200
        document = await response.json()
    assert document["openapi"] == "3.0.3" and "/v1/jobs" in document["paths"]
