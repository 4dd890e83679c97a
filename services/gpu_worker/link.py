"""The worker's side of the link: register, take assignments, run them, stream back the results.

All writes to the stream go through one outbox, so progress, heartbeats and results never interleave
on the wire. A job the worker holds is either waiting for a slot (prefetched) or running; the
heartbeat lists both, so the scheduler keeps their leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from kiln.worker.v1 import worker_service_pb2 as pb
from kiln.worker.v1 import worker_service_pb2_grpc as pb_grpc
from opentelemetry.trace import StatusCode

from libs.convert import error_to_pb, spec_from_pb
from libs.jobs import JobError
from libs.serving import GRPC_OPTIONS
from libs.telemetry import context_from, tracer
from services.gpu_worker.runner import (
    Cancelled,
    ExecutionTimeout,
    Image,
    InvalidOutput,
    ModelLoadError,
    OutOfMemory,
    PipelineRunner,
    RunOptions,
    WorkerCrashed,
)

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
# How long a draining worker waits for the scheduler to take the last messages before it hangs up.
CLOSE_WAIT_S = 5.0

Outbox = asyncio.Queue[pb.ConnectRequest | None]


@dataclass
class Held:
    attempt: int
    cancel: asyncio.Event
    task: asyncio.Task[None]
    # False while it waits for a slot.
    started: bool = False


def job_error(exc: Exception) -> JobError:
    """The one place a failed run becomes the error the client sees."""
    if isinstance(exc, OutOfMemory):
        return JobError(
            "RESOURCE_EXHAUSTED",
            "the GPU ran out of memory running this job",
            "OUT_OF_MEMORY",
            {
                "vram_total_bytes": str(exc.vram_total_bytes),
                "vram_free_bytes": str(exc.vram_free_bytes),
                "vram_needed_bytes": str(exc.vram_needed_bytes),
                "memory_savers": _flag(exc.memory_savers),
            },
        )
    if isinstance(exc, WorkerCrashed):
        cause = {"signal": str(exc.signal)} if exc.signal is not None else {"exit_code": str(exc.exit_code)}
        return JobError("UNAVAILABLE", str(exc), "WORKER_CRASHED", cause)
    if isinstance(exc, ModelLoadError):
        return JobError("UNAVAILABLE", str(exc), "MODEL_LOAD_FAILED", {"model": exc.model})
    if isinstance(exc, ExecutionTimeout):
        metadata = {"execution_timeout_ms": str(round(exc.timeout_s * 1000)), "step": str(exc.step)}
        return JobError("DEADLINE_EXCEEDED", str(exc), "DEADLINE_EXCEEDED", metadata)
    if isinstance(exc, InvalidOutput):
        metadata = {"check": exc.check, "full_precision": _flag(exc.full_precision)}
        return JobError("INTERNAL", str(exc), "INVALID_OUTPUT", metadata)
    return JobError("INTERNAL", "the pipeline failed", "PIPELINE_ERROR")


def _flag(value: bool) -> str:
    return "true" if value else "false"


class WorkerLink:
    def __init__(
        self, *, scheduler_address: str, worker_id: str, slots: int, prefetch: int, runner: PipelineRunner
    ) -> None:
        self._address = scheduler_address
        self.worker_id = worker_id
        self._slots = slots
        self._prefetch = prefetch
        self._runner = runner
        self._free = asyncio.Semaphore(slots)
        self._held: dict[str, Held] = {}
        self._outbox: Outbox = asyncio.Queue()
        self._draining = False
        self._stream_closed = asyncio.Event()
        self.connected = asyncio.Event()

    async def run_forever(self, reconnect_s: float) -> None:
        while not self._draining:
            try:
                await self._session()
            except grpc.aio.AioRpcError as exc:
                log.warning("link to scheduler %s lost: %s", self._address, exc.code().name)
            finally:
                self.connected.clear()
                self._abandon_all()
            await asyncio.sleep(reconnect_s)

    async def drain(self, timeout_s: float) -> None:
        """Hands back the jobs still waiting, gives the running ones `timeout_s` to finish, hangs up.

        Runs cut short send nothing: the scheduler requeues what it gets neither a result nor a
        release for.
        """
        self._draining = True
        outbox = self._outbox
        outbox.put_nowait(pb.ConnectRequest(draining=pb.Draining()))
        for job_id, held in list(self._held.items()):
            if not held.started:
                held.task.cancel()
                del self._held[job_id]
                outbox.put_nowait(
                    pb.ConnectRequest(released=pb.JobReleased(job_id=job_id, attempt=held.attempt))
                )
        running = [held.task for held in self._held.values()]
        if running:
            _, late = await asyncio.wait(running, timeout=timeout_s)
            for held in self._held.values():
                held.cancel.set()
            for task in late:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        outbox.put_nowait(None)
        if self.connected.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stream_closed.wait(), CLOSE_WAIT_S)

    async def _session(self) -> None:
        async with grpc.aio.insecure_channel(self._address, options=GRPC_OPTIONS) as channel:
            self._outbox = asyncio.Queue()
            self._stream_closed.clear()
            states, vram = self._runner.models(), self._runner.vram()
            self._outbox.put_nowait(
                pb.ConnectRequest(
                    register=pb.Register(
                        worker_id=self.worker_id,
                        models=states.ready,
                        device=self._runner.device,
                        slots=self._slots,
                        prefetch=self._prefetch,
                        failed_models=[pb.ModelFailure(model=m, message=r) for m, r in states.failed.items()],
                        vram_total_bytes=vram.total_bytes,
                        vram_free_bytes=vram.free_bytes,
                    )
                )
            )
            call = pb_grpc.WorkerServiceStub(channel).Connect(self._send(self._outbox))
            beat: asyncio.Task[None] | None = None
            try:
                async for msg in call:
                    kind = msg.WhichOneof("kind")
                    if kind == "registered":
                        log.info("registered with scheduler %s as %s", self._address, self.worker_id)
                        self.connected.set()
                        beat = asyncio.create_task(
                            self._heartbeat(msg.registered.heartbeat_interval_ms / 1000)
                        )
                    elif kind == "assignment":
                        self._take(msg.assignment)
                    elif kind == "cancel":
                        self._cancel(msg.cancel.job_id, msg.cancel.attempt)
            finally:
                if beat is not None:
                    beat.cancel()

    async def _send(self, outbox: Outbox) -> AsyncIterator[pb.ConnectRequest]:
        while (msg := await outbox.get()) is not None:
            yield msg
        self._stream_closed.set()

    async def _heartbeat(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            states = self._runner.models()
            self._outbox.put_nowait(
                pb.ConnectRequest(
                    heartbeat=pb.Heartbeat(
                        jobs=[pb.JobRef(job_id=j, attempt=h.attempt) for j, h in self._held.items()],
                        vram_free_bytes=self._runner.vram().free_bytes,
                        models=states.ready,
                        failed_models=[pb.ModelFailure(model=m, message=r) for m, r in states.failed.items()],
                    )
                )
            )

    def _take(self, assignment: pb.Assignment) -> None:
        if self._draining:
            released = pb.JobReleased(job_id=assignment.job_id, attempt=assignment.attempt)
            self._outbox.put_nowait(pb.ConnectRequest(released=released))
            return
        cancel = asyncio.Event()
        task = asyncio.create_task(self._run(assignment, cancel), name=f"job-{assignment.job_id}")
        self._held[assignment.job_id] = Held(assignment.attempt, cancel, task)

    def _cancel(self, job_id: str, attempt: int) -> None:
        held = self._held.get(job_id)
        if held is None or held.attempt != attempt:
            return
        if held.started:
            held.cancel.set()  # the run stops at its next step and reports the step
            return
        held.task.cancel()
        del self._held[job_id]
        self._outbox.put_nowait(
            pb.ConnectRequest(cancelled=pb.JobCancelled(job_id=job_id, attempt=attempt, step=0))
        )

    def _abandon_all(self) -> None:
        """The scheduler requeues what this worker held; stop burning the GPU on it."""
        for held in self._held.values():
            held.cancel.set()
            held.task.cancel()
        self._held.clear()

    async def _run(self, assignment: pb.Assignment, cancel: asyncio.Event) -> None:
        job_id, attempt = assignment.job_id, assignment.attempt
        try:
            async with self._free:
                held = self._held.get(job_id)
                if held is not None and held.attempt == attempt:
                    held.started = True
                await self._run_in_slot(assignment, cancel)
        finally:
            held = self._held.get(job_id)
            if held is not None and held.attempt == attempt:
                del self._held[job_id]

    async def _run_in_slot(self, assignment: pb.Assignment, cancel: asyncio.Event) -> None:
        job_id, attempt = assignment.job_id, assignment.attempt
        outbox = self._outbox
        spec = spec_from_pb(assignment.text_to_image)

        def on_step(step: int, total: int) -> None:
            outbox.put_nowait(
                pb.ConnectRequest(
                    progress=pb.JobProgress(job_id=job_id, attempt=attempt, step=step, total_steps=total)
                )
            )

        # Tells the scheduler the job left the prefetch queue: from here it runs.
        on_step(0, spec.steps)
        options = RunOptions(assignment.options.memory_savers, assignment.options.full_precision)
        attributes: dict[str, str | int | bool] = {
            "kiln.job": f"jobs/{job_id}",
            "kiln.attempt": attempt,
            "kiln.model": assignment.model,
            "kiln.worker": self.worker_id,
            "kiln.width": spec.width,
            "kiln.height": spec.height,
            "kiln.steps": spec.steps,
            "kiln.num_images": spec.num_images,
            "kiln.memory_savers": options.memory_savers,
            "kiln.full_precision": options.full_precision,
        }
        with tracer(__name__).start_as_current_span(
            "run", context=context_from(assignment.traceparent), attributes=attributes
        ) as span:
            try:
                generated = await self._runner.run(
                    assignment.model,
                    spec,
                    on_step,
                    cancel,
                    options,
                    attempt=attempt,
                    execution_timeout_s=assignment.execution_timeout.ToMilliseconds() / 1000,
                    job_id=job_id,
                )
            except Cancelled as exc:
                span.set_attribute("kiln.outcome", "cancelled")
                done = pb.JobCancelled(job_id=job_id, attempt=attempt, step=exc.step)
                outbox.put_nowait(pb.ConnectRequest(cancelled=done))
            except Exception as exc:
                error = job_error(exc)
                if error.reason == "PIPELINE_ERROR":
                    log.error("job %s attempt %d failed: %s", job_id, attempt, exc)
                    span.record_exception(exc)
                else:
                    log.warning("job %s attempt %d failed: %s: %s", job_id, attempt, error.reason, exc)
                span.set_status(StatusCode.ERROR, error.reason)
                failed = pb.JobFailed(job_id=job_id, attempt=attempt, error=error_to_pb(error))
                outbox.put_nowait(pb.ConnectRequest(failed=failed))
            else:
                if cancel.is_set():  # cancelled while the images were decoded: don't send them
                    span.set_attribute("kiln.outcome", "cancelled")
                    done = pb.JobCancelled(job_id=job_id, attempt=attempt, step=spec.steps)
                    outbox.put_nowait(pb.ConnectRequest(cancelled=done))
                else:
                    span.set_attribute("kiln.outcome", "succeeded")
                    self._send_images(outbox, job_id, attempt, generated.images)
                    log.info("sent result of jobs/%s attempt %d", job_id, attempt)

    @staticmethod
    def _send_images(outbox: Outbox, job_id: str, attempt: int, images: list[Image]) -> None:
        for index, image in enumerate(images):
            for offset in range(0, len(image.png), CHUNK_BYTES):
                outbox.put_nowait(
                    pb.ConnectRequest(
                        chunk=pb.ResultChunk(
                            job_id=job_id,
                            attempt=attempt,
                            index=index,
                            data=image.png[offset : offset + CHUNK_BYTES],
                        )
                    )
                )
        outbox.put_nowait(
            pb.ConnectRequest(
                completed=pb.JobCompleted(
                    job_id=job_id,
                    attempt=attempt,
                    images=[
                        pb.ImageInfo(
                            index=i,
                            mime_type="image/png",
                            size_bytes=len(img.png),
                            sha256=img.sha256,
                            seed=img.seed,
                            width=img.width,
                            height=img.height,
                        )
                        for i, img in enumerate(images)
                    ],
                )
            )
        )
