"""The worker's side of the link, against a real gRPC peer on port 0 that the test drives as the
scheduler would: what the worker announces, heartbeats, progress, failures, cancels and drain."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from kiln.v1 import job_pb2
from kiln.worker.v1 import worker_service_pb2 as pb
from kiln.worker.v1 import worker_service_pb2_grpc as pb_grpc

from libs.catalog import TINY_SD, ModelSpec
from libs.convert import error_from_pb
from libs.errors import DOMAIN
from libs.jobs import JobError, TextToImage
from libs.settings import WorkerSettings
from services.gpu_worker.app import WorkerApp
from services.gpu_worker.faults import FaultRule
from services.gpu_worker.generate import generate
from services.gpu_worker.loader import load_pipeline
from services.gpu_worker.process_runner import ProcessRunner
from services.gpu_worker.tiny_sd import build_tiny_sd

GiB = 1 << 30
FAULTS = [
    FaultRule(kind="oom", prompt_contains="[oom]", at_step=2, vram_needed_bytes=12 * GiB),
    FaultRule(kind="hang", prompt_contains="[hang]", at_step=2),
]


class Peer(pb_grpc.WorkerServiceServicer):
    """The scheduler's end of one link: records what the worker sends, sends what the test queues."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[pb.ConnectRequest] = asyncio.Queue()
        self.heartbeats: list[pb.Heartbeat] = []
        self.ended = asyncio.Event()
        self._out: asyncio.Queue[pb.ConnectResponse | None] = asyncio.Queue()

    async def Connect(
        self, request_iterator: AsyncIterator[pb.ConnectRequest], context: Any
    ) -> AsyncIterator[pb.ConnectResponse]:
        async def read() -> None:
            async for msg in request_iterator:
                if msg.WhichOneof("kind") == "heartbeat":
                    self.heartbeats.append(msg.heartbeat)
                else:
                    self.received.put_nowait(msg)
            self.ended.set()
            self._out.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            yield pb.ConnectResponse(registered=pb.Registered(heartbeat_interval_ms=50))
            while (msg := await self._out.get()) is not None:
                yield msg
        finally:
            reader.cancel()

    def assign(
        self, job_id: str, attempt: int, prompt: str, *, model: str = "tiny-sd", steps: int = 4
    ) -> None:
        spec = job_pb2.TextToImage(
            prompt=prompt, width=64, height=64, steps=steps, guidance_scale=7.5, seed=7, num_images=1
        )
        assignment = pb.Assignment(job_id=job_id, attempt=attempt, model=model, text_to_image=spec)
        self._out.put_nowait(pb.ConnectResponse(assignment=assignment))

    def cancel(self, job_id: str, attempt: int) -> None:
        self._out.put_nowait(pb.ConnectResponse(cancel=pb.CancelAssignment(job_id=job_id, attempt=attempt)))

    async def next(self) -> pb.ConnectRequest:
        return await asyncio.wait_for(self.received.get(), 30)

    async def heartbeat_where(self, check: Callable[[pb.Heartbeat], bool]) -> pb.Heartbeat:
        self.heartbeats.clear()
        while True:
            for beat in self.heartbeats:
                if check(beat):
                    return beat
            await asyncio.sleep(0.02)


@dataclass
class Linked:
    peer: Peer
    worker: WorkerApp
    register: pb.Register


def _progress(job_id: str, attempt: int, step: int, total: int = 4) -> pb.ConnectRequest:
    return pb.ConnectRequest(
        progress=pb.JobProgress(job_id=job_id, attempt=attempt, step=step, total_steps=total)
    )


def _held(beat: pb.Heartbeat) -> list[tuple[str, int]]:
    return sorted((ref.job_id, ref.attempt) for ref in beat.jobs)


@pytest.fixture(scope="module")
def broken_model(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    path = tmp_path_factory.mktemp("models") / "broken"
    build_tiny_sd().save_pretrained(path, safe_serialization=True)
    weights = path / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\xff" * 64)
    return TINY_SD.model_copy(update={"source": str(path)})


async def _link(broken: ModelSpec, worker_id: str, **settings: Any) -> tuple[grpc.aio.Server, Linked]:
    peer = Peer()
    server = grpc.aio.server()
    pb_grpc.add_WorkerServiceServicer_to_server(peer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    worker = WorkerApp(
        WorkerSettings(
            scheduler_address=f"127.0.0.1:{port}",
            worker_id=worker_id,
            worker_models=["tiny-sd", "broken"],
            models={"broken": broken},
            fake_vram_total_bytes=24 * GiB,
            fake_vram_free_bytes=3 * GiB,
            faults=FAULTS,
            **settings,
        )
    )
    await worker.start()
    first = await peer.next()
    return server, Linked(peer, worker, first.register)


@pytest.fixture(scope="module")
async def linked(broken_model: ModelSpec) -> AsyncIterator[Linked]:
    server, linked = await _link(broken_model, "link-worker", worker_slots=1, worker_prefetch=1)
    yield linked
    await linked.worker.stop()
    await server.stop(0)


@pytest.mark.timeout(60)
async def test_register_announces_models_failures_slots_prefetch_and_vram(linked: Linked) -> None:
    reg = linked.register
    assert (reg.worker_id, list(reg.models), reg.device, reg.slots, reg.prefetch) == (
        "link-worker",
        ["tiny-sd"],
        "cpu",
        1,
        1,
    )
    assert (reg.vram_total_bytes, reg.vram_free_bytes) == (24 * GiB, 3 * GiB)
    [failure] = reg.failed_models
    assert failure.model == "broken"
    assert failure.message.startswith("model 'broken': cannot load ")


@pytest.mark.timeout(60)
async def test_a_run_sends_step_0_each_step_then_the_image(linked: Linked) -> None:
    peer = linked.peer
    peer.assign("j-ok", 1, "a red fox")
    assert [await peer.next() for _ in range(5)] == [_progress("j-ok", 1, step) for step in range(5)]
    chunk, completed = await peer.next(), await peer.next()
    spec = TextToImage("a red fox", "", 64, 64, 4, 7.5, 7, 1)
    [expected] = generate(load_pipeline(TINY_SD, "cpu"), spec, lambda i, n: None, threading.Event()).images
    assert chunk.chunk == pb.ResultChunk(job_id="j-ok", attempt=1, index=0, data=expected.png)
    assert completed.completed == pb.JobCompleted(
        job_id="j-ok",
        attempt=1,
        images=[
            pb.ImageInfo(
                index=0,
                mime_type="image/png",
                size_bytes=len(expected.png),
                sha256=hashlib.sha256(expected.png).hexdigest(),
                seed=7,
                width=64,
                height=64,
            )
        ],
    )


@pytest.mark.timeout(60)
async def test_an_injected_oom_fails_the_job_with_its_status(linked: Linked) -> None:
    peer = linked.peer
    peer.assign("j-oom", 3, "[oom] a red fox")
    assert [await peer.next() for _ in range(2)] == [_progress("j-oom", 3, 0), _progress("j-oom", 3, 1)]
    failed = (await peer.next()).failed
    assert (failed.job_id, failed.attempt) == ("j-oom", 3)
    assert error_from_pb(failed.error) == JobError(
        "RESOURCE_EXHAUSTED",
        "the GPU ran out of memory running this job",
        "OUT_OF_MEMORY",
        {
            "vram_total_bytes": str(24 * GiB),
            "vram_free_bytes": str(3 * GiB),
            "vram_needed_bytes": str(12 * GiB),
            "memory_savers": "false",
        },
    )
    info = error_details_pb2.ErrorInfo()
    failed.error.details[0].Unpack(info)
    assert info.domain == DOMAIN


@pytest.mark.timeout(60)
async def test_a_job_for_a_model_that_failed_to_load_fails_model_load_failed(linked: Linked) -> None:
    peer = linked.peer
    peer.assign("j-broken", 1, "a red fox", model="broken")
    assert await peer.next() == _progress("j-broken", 1, 0)
    error = error_from_pb((await peer.next()).failed.error)
    assert (error.code, error.reason, error.metadata) == (
        "UNAVAILABLE",
        "MODEL_LOAD_FAILED",
        {"model": "broken"},
    )


@pytest.mark.timeout(60)
async def test_heartbeats_list_held_jobs_and_a_waiting_job_cancels_at_step_0(linked: Linked) -> None:
    peer = linked.peer
    peer.assign("j-hang", 1, "[hang] a red fox")
    assert [await peer.next() for _ in range(2)] == [_progress("j-hang", 1, 0), _progress("j-hang", 1, 1)]
    peer.assign("j-wait", 2, "a red fox")  # the only slot is taken: it waits, prefetched
    beat = await peer.heartbeat_where(lambda b: len(b.jobs) == 2)
    assert _held(beat) == [("j-hang", 1), ("j-wait", 2)]
    assert (beat.vram_free_bytes, list(beat.models)) == (3 * GiB, ["tiny-sd"])
    assert [f.model for f in beat.failed_models] == ["broken"]
    peer.cancel("j-wait", 2)
    assert await peer.next() == pb.ConnectRequest(
        cancelled=pb.JobCancelled(job_id="j-wait", attempt=2, step=0)
    )
    beat = await peer.heartbeat_where(lambda b: len(b.jobs) == 1)
    assert _held(beat) == [("j-hang", 1)]
    # The hung step never sees the cancel: the child is killed after the grace, and a new one serves.
    peer.cancel("j-hang", 1)
    assert await peer.next() == pb.ConnectRequest(
        cancelled=pb.JobCancelled(job_id="j-hang", attempt=1, step=1)
    )
    assert _held(await peer.heartbeat_where(lambda b: True)) == []


@pytest.mark.timeout(60)
async def test_stop_drains_releases_waiting_jobs_finishes_running_ones_and_stops_children(
    broken_model: ModelSpec,
) -> None:
    server, linked = await _link(
        broken_model, "draining-worker", worker_slots=2, worker_prefetch=1, worker_drain_seconds=6.0
    )
    peer, worker = linked.peer, linked.worker
    try:
        peer.assign("j-run", 1, "a red fox", steps=100)
        peer.assign("j-hang", 1, "[hang] a red fox")
        peer.assign("j-wait", 1, "a red fox")
        await peer.heartbeat_where(lambda b: len(b.jobs) == 3)
        assert isinstance(worker.runner, ProcessRunner)
        pids = worker.runner.child_pids()
        start = time.monotonic()
        await worker.stop()
        elapsed = time.monotonic() - start
        sent: list[tuple[str, str]] = []
        while not peer.received.empty():
            msg = peer.received.get_nowait()
            kind = msg.WhichOneof("kind") or ""
            sent.append((kind, getattr(msg, kind).job_id if kind != "draining" else ""))
        draining = sent.index(("draining", ""))
        assert {kind for kind, _ in sent[:draining]} == {"progress"}
        assert sent[draining + 1] == ("released", "j-wait")
        # The running job finishes and its result goes out; the hung one is cut off after the drain
        # time and sends nothing, so the scheduler requeues it.
        assert [m for m in sent[draining + 2 :] if m[0] != "progress"] == [
            ("chunk", "j-run"),
            ("completed", "j-run"),
        ]
        assert {kind for kind, job in sent if job == "j-hang"} == {"progress"}
        assert peer.ended.is_set()
        assert 6.0 <= elapsed < 12
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        await server.stop(0)
