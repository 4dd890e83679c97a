"""A job's whole life through the real suite: submit, run on tiny-sd, watch, fetch, cancel."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import grpc
import pytest
from google.rpc import code_pb2
from kiln.v1 import job_pb2
from kiln.v1 import job_service_pb2 as pb
from kiln.v1 import job_service_pb2_grpc as pb_grpc

from libs.errors import FailedPrecondition
from libs.sdk.client import KilnClient
from tests.conftest import Stack
from tests.helpers import auth, png_size, rest_wait, sha256, sse_events

pytestmark = pytest.mark.timeout(120)


def t2i_body(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny-sd", "textToImage": {"prompt": "a lighthouse at dusk", **fields}}


async def rest_submit(
    http: aiohttp.ClientSession, stack: Stack, body: dict[str, Any], key: str = ""
) -> dict[str, Any]:
    async with http.post(f"{stack.http_base}/v1/jobs", json=body, headers=auth(key or stack.key_a)) as resp:
        assert resp.status == 200, await resp.text()
        job: dict[str, Any] = await resp.json()
        return job


async def rest_download(http: aiohttp.ClientSession, stack: Stack, name: str, key: str = "") -> bytes:
    async with http.get(f"{stack.http_base}/v1/{name}:read", headers=auth(key or stack.key_a)) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"] == "image/png"
        return await resp.read()


async def test_rest_job_succeeds_with_matching_png(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        job = await rest_submit(http, stack, t2i_body(width=64, height=128, steps=4, seed="11"))
        assert job["state"] == "STATE_QUEUED"
        assert job["name"].startswith("jobs/")
        done = await rest_wait(http, stack.http_base, stack.key_a, job["name"])
        assert done["state"] == "STATE_SUCCEEDED"
        assert done["progress"] == {"step": 4, "totalSteps": 4}
        [artifact] = done["artifacts"]
        data = await rest_download(http, stack, artifact["name"])
    assert png_size(data) == (64, 128)
    assert artifact["sha256"] == sha256(data)
    assert artifact["sizeBytes"] == str(len(data))
    assert artifact["seed"] == "11"
    assert artifact["mimeType"] == "image/png"


async def test_grpc_job_succeeds_with_matching_png(stack: Stack) -> None:
    async with KilnClient(stack.grpc_target, stack.key_a) as client:
        job = await client.create_job(
            job_pb2.Job(
                model="tiny-sd",
                text_to_image=job_pb2.TextToImage(
                    prompt="a lighthouse", width=128, height=64, steps=3, seed=5, num_images=2
                ),
            )
        )
        assert job.state == job_pb2.Job.STATE_QUEUED
        while job.state not in (job_pb2.Job.STATE_SUCCEEDED, job_pb2.Job.STATE_FAILED):
            await asyncio.sleep(0.05)
            job = await client.get_job(job.name)
        assert job.state == job_pb2.Job.STATE_SUCCEEDED
        assert [a.seed for a in job.artifacts] == [5, 6]
        for artifact in job.artifacts:
            data = await client.download(artifact.name)
            assert png_size(data) == (128, 64)
            assert sha256(data) == artifact.sha256
        assert job.start_time.ToMilliseconds() >= job.create_time.ToMilliseconds()
        assert job.end_time.ToMilliseconds() >= job.start_time.ToMilliseconds()


async def test_grpc_watch_delivers_every_state_and_step_then_ends(stack: Stack) -> None:
    async with KilnClient(stack.grpc_target, stack.key_a) as client:
        job = await client.create_job(
            job_pb2.Job(
                model="tiny-sd", text_to_image=job_pb2.TextToImage(prompt="watch me", steps=6, seed=3)
            )
        )
        seen: list[tuple[str, int]] = []
        ids: list[str] = []
        async for event in client.watch(job.name):
            seen.append((job_pb2.Job.State.Name(event.job.state), event.job.progress.step))
            ids.append(event.event_id)
    assert seen == [
        ("STATE_QUEUED", 0),
        ("STATE_RUNNING", 0),
        *[("STATE_RUNNING", step) for step in range(1, 7)],
        ("STATE_SUCCEEDED", 6),
    ]
    assert len(set(ids)) == len(ids)


async def test_sse_watch_delivers_every_state_and_step_then_ends_and_resumes(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        job = await rest_submit(http, stack, t2i_body(steps=5, seed="4"))
        url = f"{stack.http_base}/v1/{job['name']}:watch"
        events: list[tuple[str, str, dict[str, Any]]] = []
        async with http.get(url, headers=auth(stack.key_a)) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            events = [e async for e in sse_events(resp)]
        seen = [
            (data["job"]["state"], data["job"].get("progress", {}).get("step", 0)) for _, _, data in events
        ]
        assert seen == [
            ("STATE_QUEUED", 0),
            ("STATE_RUNNING", 0),
            *[("STATE_RUNNING", step) for step in range(1, 6)],
            ("STATE_SUCCEEDED", 5),
        ]
        assert all(event_id == data["eventId"] for event_id, _, data in events)
        # Reattach after the fourth event: only the rest arrives.
        resume_from = events[3][0]
        async with http.get(url, headers={**auth(stack.key_a), "Last-Event-ID": resume_from}) as resp:
            rest = [e async for e in sse_events(resp)]
        assert [e[0] for e in rest] == [e[0] for e in events[4:]]


async def test_same_seed_is_byte_identical_and_other_seed_differs(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        names = []
        for seed in ("42", "42", "43"):
            job = await rest_submit(
                http, stack, t2i_body(width=96, height=64, steps=4, seed=seed, guidanceScale=5.0)
            )
            names.append(job["name"])
        images = []
        for name in names:
            done = await rest_wait(http, stack.http_base, stack.key_a, name)
            images.append(await rest_download(http, stack, done["artifacts"][0]["name"]))
    assert images[0] == images[1]
    assert images[0] != images[2]


async def test_cancel_at_step_ten_stops_within_two_steps_without_artifacts(stack: Stack) -> None:
    async with KilnClient(stack.grpc_target, stack.key_a) as client:
        job = await client.create_job(
            job_pb2.Job(
                model="tiny-sd",
                text_to_image=job_pb2.TextToImage(
                    prompt="a long one", width=384, height=384, steps=50, seed=9
                ),
            )
        )
        cancelled_at = None
        final = job
        async for event in client.watch(job.name):
            final = event.job
            if cancelled_at is None and final.progress.step >= 10:
                cancelled_at = final.progress.step
                await client.cancel_job(job.name)
        assert cancelled_at == 10
        assert final.state == job_pb2.Job.STATE_CANCELLED
        assert final.progress.step <= cancelled_at + 2
        assert list(final.artifacts) == []
        assert final.error.code == code_pb2.CANCELLED
        again = await client.get_job(job.name)
        assert again.state == job_pb2.Job.STATE_CANCELLED


async def test_cancelling_a_finished_job_is_a_precondition_failure(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        job = await rest_submit(http, stack, t2i_body(seed="1"))
        await rest_wait(http, stack.http_base, stack.key_a, job["name"])
        async with http.post(
            f"{stack.http_base}/v1/{job['name']}:cancel", json={}, headers=auth(stack.key_a)
        ) as resp:
            assert resp.status == 409
            body = await resp.json()
        assert body["error"]["status"] == "FAILED_PRECONDITION"
        assert body["error"]["details"][0]["reason"] == "JOB_ALREADY_ENDED"
        after = await rest_wait(http, stack.http_base, stack.key_a, job["name"])
        assert after["state"] == "STATE_SUCCEEDED"
        assert len(after["artifacts"]) == 1
    async with KilnClient(stack.grpc_target, stack.key_a) as client:
        with pytest.raises(FailedPrecondition) as err:
            await client.cancel_job(job["name"])
        assert err.value.reason == "JOB_ALREADY_ENDED"


async def test_unicode_prompt_round_trips_exactly(stack: Stack) -> None:
    prompt = "🦊 a fox 狐狸 in the snow 👩‍👩‍👧‍👦 ‍zero‍width‌joiners 🏳️‍🌈 é"
    async with aiohttp.ClientSession() as http:
        job = await rest_submit(http, stack, t2i_body(prompt=prompt, seed="2"))
        async with http.get(f"{stack.http_base}/v1/{job['name']}", headers=auth(stack.key_a)) as resp:
            got = await resp.json()
    assert got["textToImage"]["prompt"] == prompt
    async with KilnClient(stack.grpc_target, stack.key_a) as client:
        assert (await client.get_job(job["name"])).text_to_image.prompt == prompt


async def test_large_int64_seed_as_json_string_round_trips(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        job = await rest_submit(http, stack, t2i_body(seed="9007199254740993"))
        assert job["textToImage"]["seed"] == "9007199254740993"
        done = await rest_wait(http, stack.http_base, stack.key_a, job["name"])
    assert done["textToImage"]["seed"] == "9007199254740993"
    assert done["artifacts"][0]["seed"] == "9007199254740993"


async def test_1024_square_artifact_is_fetched_whole_in_chunks_over_grpc(stack: Stack) -> None:
    async with KilnClient(stack.grpc_target, stack.key_a) as client:
        job = await client.create_job(
            job_pb2.Job(
                model="tiny-sd",
                text_to_image=job_pb2.TextToImage(prompt="big", width=1024, height=1024, steps=1, seed=8),
            )
        )
        while job.state not in (job_pb2.Job.STATE_SUCCEEDED, job_pb2.Job.STATE_FAILED):
            await asyncio.sleep(0.1)
            job = await client.get_job(job.name)
        assert job.state == job_pb2.Job.STATE_SUCCEEDED
        [artifact] = job.artifacts
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        stub = pb_grpc.JobServiceStub(channel)
        chunks = [
            c
            async for c in stub.ReadArtifact(
                pb.ReadArtifactRequest(name=artifact.name),
                metadata=(("authorization", f"Bearer {stack.key_a}"),),
            )
        ]
    data = b"".join(c.data for c in chunks)
    assert len(chunks) == -(-artifact.size_bytes // (1 << 20))
    assert len(chunks) > 1
    assert all(c.content_type == "image/png" for c in chunks)
    assert len(data) == artifact.size_bytes
    assert sha256(data) == artifact.sha256
    assert png_size(data) == (1024, 1024)


async def test_model_loaded_from_a_diffusers_directory_matches_the_builtin(stack: Stack) -> None:
    """`local-tiny` is tiny-sd saved to disk and loaded with from_pretrained(local_files_only=True)."""
    async with aiohttp.ClientSession() as http:
        images = []
        for model in ("local-tiny", "tiny-sd"):
            job = await rest_submit(
                http, stack, {"model": model, "textToImage": {"prompt": "same", "seed": "77"}}
            )
            done = await rest_wait(http, stack.http_base, stack.key_a, job["name"])
            assert done["state"] == "STATE_SUCCEEDED", done
            assert done["model"] == model
            images.append(await rest_download(http, stack, done["artifacts"][0]["name"]))
    assert images[0] == images[1]
