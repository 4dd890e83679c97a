"""Bad input is refused at the door with 400 naming the field, and nothing is created."""

from __future__ import annotations

from typing import Any

import aiohttp
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from kiln.v1 import job_pb2
from kiln.v1 import job_service_pb2 as pb
from kiln.v1 import job_service_pb2_grpc as pb_grpc

from libs.api_keys import ApiKeys
from tests.conftest import Stack
from tests.helpers import auth

pytestmark = pytest.mark.timeout(60)

T2I = "job.text_to_image"
SIZE_RULE = "must be a multiple of 16 between 64 and 1024 for model tiny-sd"

CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("width 520", {"width": 520}, f"{T2I}.width", f"{SIZE_RULE}, got 520"),
    ("width 427", {"width": 427}, f"{T2I}.width", f"{SIZE_RULE}, got 427"),
    ("width 0", {"width": 0}, f"{T2I}.width", f"{SIZE_RULE}, got 0"),
    ("height -512", {"height": -512}, f"{T2I}.height", f"{SIZE_RULE}, got -512"),
    ("height 100000", {"height": 100000}, f"{T2I}.height", f"{SIZE_RULE}, got 100000"),
    ("width as string", {"width": "512"}, f"{T2I}.width", "JSON number"),
    ("steps 0", {"steps": 0}, f"{T2I}.steps", "must be between 1 and 150, got 0"),
    ("steps -1", {"steps": -1}, f"{T2I}.steps", "must be between 1 and 150, got -1"),
    ("steps 1000000", {"steps": 1000000}, f"{T2I}.steps", "must be between 1 and 150, got 1000000"),
    ("empty prompt", {"prompt": ""}, f"{T2I}.prompt", "must not be empty"),
    (
        "100 kB prompt",
        {"prompt": "x" * 100_000},
        f"{T2I}.prompt",
        "must be at most 2000 characters, got 100000",
    ),
]


@pytest.fixture(scope="module")
async def fresh_key(stack: Stack) -> str:
    """A tenant of its own, so 'nothing was created' can be checked exactly."""
    from redis.asyncio import Redis

    redis = Redis.from_url(stack.redis_url)
    key = await ApiKeys(redis).create("tenant-bad-input")
    await redis.aclose()
    return key


async def _list_count(http: aiohttp.ClientSession, stack: Stack, key: str) -> int:
    async with http.get(f"{stack.http_base}/v1/jobs", headers=auth(key)) as resp:
        assert resp.status == 200
        return len((await resp.json()).get("jobs", []))


@pytest.mark.parametrize(("label", "fields", "field", "description"), CASES, ids=[c[0] for c in CASES])
async def test_rest_bad_input_names_the_field(
    stack: Stack, fresh_key: str, label: str, fields: dict[str, Any], field: str, description: str
) -> None:
    body = {"model": "tiny-sd", "textToImage": {"prompt": "ok", **fields}}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{stack.http_base}/v1/jobs", json=body, headers=auth(fresh_key)) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
        assert error["status"] == "INVALID_ARGUMENT"
        [bad_request] = [d for d in error["details"] if d["@type"].endswith("google.rpc.BadRequest")]
        [violation] = bad_request["fieldViolations"]
        assert violation["field"] == field
        assert description in violation["description"]
        assert await _list_count(http, stack, fresh_key) == 0


async def test_rest_unknown_model_lists_the_models(stack: Stack, fresh_key: str) -> None:
    body = {"model": "sdxl-turbo", "textToImage": {"prompt": "ok"}}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{stack.http_base}/v1/jobs", json=body, headers=auth(fresh_key)) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
        info = next(d for d in error["details"] if d["@type"].endswith("ErrorInfo"))
        assert info["reason"] == "UNKNOWN_MODEL"
        violations = next(d for d in error["details"] if d["@type"].endswith("BadRequest"))["fieldViolations"]
        assert violations == [
            {
                "field": "job.model",
                "description": (
                    "must be one of: local-tiny, metered, solo, tiny-sd, unserved; got 'sdxl-turbo'"
                ),
            }
        ]
        assert await _list_count(http, stack, fresh_key) == 0


async def test_grpc_bad_input_carries_bad_request_details(stack: Stack, fresh_key: str) -> None:
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        stub = pb_grpc.JobServiceStub(channel)
        request = pb.CreateJobRequest(
            job=job_pb2.Job(
                model="tiny-sd", text_to_image=job_pb2.TextToImage(prompt="ok", width=520, steps=0)
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateJob(request, metadata=(("authorization", f"Bearer {fresh_key}"),))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    raw = dict(err.value.trailing_metadata() or ())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(raw)
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in status.details if d.Is(bad.DESCRIPTOR))
    assert [(v.field, v.description) for v in bad.field_violations] == [
        (f"{T2I}.width", f"{SIZE_RULE}, got 520"),
        (f"{T2I}.steps", "must be between 1 and 150, got 0"),
    ]
