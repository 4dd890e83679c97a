"""A worker that speaks the worker protocol by hand, for tests that need to control every message:
stay silent past a lease, report a stale result, fail on cue. It is a real gRPC client of a real
scheduler; only the GPU behind it is absent."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from typing import Any

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from kiln.scheduler.v1 import scheduler_service_pb2 as spb
from kiln.scheduler.v1 import scheduler_service_pb2_grpc as spb_grpc
from kiln.v1 import job_pb2
from kiln.worker.v1 import worker_service_pb2 as pb
from kiln.worker.v1 import worker_service_pb2_grpc as pb_grpc

from libs.errors import DOMAIN


class WireWorker:
    def __init__(
        self,
        target: str,
        worker_id: str,
        models: list[str],
        *,
        slots: int = 1,
        prefetch: int = 0,
        vram_free: int = 0,
        failed_models: dict[str, str] | None = None,
        heartbeat_s: float | None = 0.1,
    ) -> None:
        self.worker_id = worker_id
        self.models = models
        self.held: set[tuple[str, int]] = set()
        self.assignments: asyncio.Queue[pb.Assignment] = asyncio.Queue()
        self.cancels: asyncio.Queue[pb.CancelAssignment] = asyncio.Queue()
        self._target = target
        self._register = pb.Register(
            worker_id=worker_id,
            models=models,
            device="cpu",
            slots=slots,
            prefetch=prefetch,
            vram_total_bytes=vram_free,
            vram_free_bytes=vram_free,
            failed_models=[pb.ModelFailure(model=m, message=t) for m, t in (failed_models or {}).items()],
        )
        self._failed = dict(failed_models or {})
        self._vram_free = vram_free
        self._heartbeat_s = heartbeat_s
        self._channel: grpc.aio.Channel | None = None
        self._call: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._writing = asyncio.Lock()

    async def start(self) -> WireWorker:
        self._channel = grpc.aio.insecure_channel(self._target)
        self._call = pb_grpc.WorkerServiceStub(self._channel).Connect()
        try:
            await self._call.write(pb.ConnectRequest(register=self._register))
            first = await self._call.read()
        except grpc.aio.AioRpcError:
            await self._channel.close()
            raise
        assert first.WhichOneof("kind") == "registered"
        self._tasks.append(asyncio.create_task(self._read()))
        if self._heartbeat_s is not None:
            self._tasks.append(asyncio.create_task(self._beat()))
        return self

    async def _read(self) -> None:
        while True:
            msg = await self._call.read()
            if msg is grpc.aio.EOF:
                return
            if msg.WhichOneof("kind") == "assignment":
                self.held.add((msg.assignment.job_id, msg.assignment.attempt))
                self.assignments.put_nowait(msg.assignment)
            elif msg.WhichOneof("kind") == "cancel":
                self.cancels.put_nowait(msg.cancel)

    async def _beat(self) -> None:
        assert self._heartbeat_s is not None
        while True:
            await self.heartbeat()
            await asyncio.sleep(self._heartbeat_s)

    async def heartbeat(self) -> None:
        beat = pb.Heartbeat(
            jobs=[pb.JobRef(job_id=j, attempt=a) for j, a in sorted(self.held)],
            vram_free_bytes=self._vram_free,
            models=self.models,
            failed_models=[pb.ModelFailure(model=m, message=t) for m, t in self._failed.items()],
        )
        await self._write(pb.ConnectRequest(heartbeat=beat))

    async def next_assignment(self, within: float = 10) -> pb.Assignment:
        return await asyncio.wait_for(self.assignments.get(), within)

    async def progress(self, a: pb.Assignment, step: int, total: int = 4) -> None:
        progress = pb.JobProgress(job_id=a.job_id, attempt=a.attempt, step=step, total_steps=total)
        await self._write(pb.ConnectRequest(progress=progress))

    async def complete(self, a: pb.Assignment, data: bytes) -> None:
        chunk = pb.ResultChunk(job_id=a.job_id, attempt=a.attempt, index=0, data=data)
        await self._write(pb.ConnectRequest(chunk=chunk))
        info = pb.ImageInfo(
            index=0,
            mime_type="image/png",
            size_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            seed=1,
            width=64,
            height=64,
        )
        done = pb.JobCompleted(job_id=a.job_id, attempt=a.attempt, images=[info])
        await self._write(pb.ConnectRequest(completed=done))
        self.held.discard((a.job_id, a.attempt))

    async def fail(self, a: pb.Assignment, code: str, reason: str, metadata: dict[str, str]) -> None:
        status = status_pb2.Status(code=code_pb2.Code.Value(code), message=f"injected {reason}")
        status.details.add().Pack(
            error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)
        )
        failed = pb.JobFailed(job_id=a.job_id, attempt=a.attempt, error=status)
        await self._write(pb.ConnectRequest(failed=failed))
        self.held.discard((a.job_id, a.attempt))

    async def release(self, a: pb.Assignment) -> None:
        await self._write(pb.ConnectRequest(released=pb.JobReleased(job_id=a.job_id, attempt=a.attempt)))
        self.held.discard((a.job_id, a.attempt))

    async def _write(self, msg: pb.ConnectRequest) -> None:
        # One write at a time: grpc refuses a second write on a stream while one is in flight,
        # and the heartbeat task writes beside the test.
        async with self._writing:
            await self._call.write(msg)

    async def send(self, msg: pb.ConnectRequest) -> None:
        """Any message at all, malformed ones included."""
        await self._write(msg)

    async def drain(self) -> None:
        await self._write(pb.ConnectRequest(draining=pb.Draining()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._call is not None:
            self._call.cancel()
        if self._channel is not None:
            with contextlib.suppress(Exception):
                await self._channel.close()


async def submit(
    target: str, tenant: str, model: str, prompt: str, *, steps: int = 4, tier: str = "enterprise"
) -> job_pb2.Job:
    """A job straight to the scheduler, fully resolved as the gateway would send it."""
    job = job_pb2.Job(
        model=model,
        text_to_image=job_pb2.TextToImage(
            prompt=prompt, width=64, height=64, steps=steps, guidance_scale=7.5, seed=1, num_images=1
        ),
    )
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await spb_grpc.SchedulerServiceStub(channel).SubmitJob(
            spb.SubmitJobRequest(tenant=tenant, tier=tier, job=job)
        )
    return reply.job
