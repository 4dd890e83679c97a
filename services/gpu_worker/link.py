"""The worker's side of the link: register, take assignments, run them, stream back the results.

All writes to the stream go through one outbox, so progress from pipeline threads, heartbeats and
results never interleave on the wire.
"""

from __future__ import annotations

import asyncio
import logging
import threading
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
from services.gpu_worker.runner import Cancelled, Image, ModelLoadError, PipelineRunner

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20


@dataclass
class Running:
    attempt: int
    cancel: threading.Event
    task: asyncio.Task[None]


class WorkerLink:
    def __init__(
        self, *, scheduler_address: str, worker_id: str, models: list[str], slots: int, runner: PipelineRunner
    ) -> None:
        self._address = scheduler_address
        self.worker_id = worker_id
        self.models = models
        self._slots = slots
        self._runner = runner
        self._running: dict[str, Running] = {}
        self._outbox: asyncio.Queue[pb.ConnectRequest] = asyncio.Queue()
        self.connected = asyncio.Event()

    async def run_forever(self, reconnect_s: float) -> None:
        while True:
            try:
                await self._session()
            except grpc.aio.AioRpcError as exc:
                log.warning("link to scheduler %s lost: %s", self._address, exc.code().name)
            finally:
                self.connected.clear()
                self._abandon_all()
            await asyncio.sleep(reconnect_s)

    async def _session(self) -> None:
        async with grpc.aio.insecure_channel(self._address, options=GRPC_OPTIONS) as channel:
            self._outbox = asyncio.Queue()
            self._outbox.put_nowait(
                pb.ConnectRequest(
                    register=pb.Register(
                        worker_id=self.worker_id,
                        models=self.models,
                        device=self._runner.device,
                        slots=self._slots,
                    )
                )
            )
            call = pb_grpc.WorkerServiceStub(channel).Connect(self._drain())
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
                        self._start(msg.assignment)
                    elif kind == "cancel":
                        running = self._running.get(msg.cancel.job_id)
                        if running is not None and running.attempt == msg.cancel.attempt:
                            running.cancel.set()
            finally:
                if beat is not None:
                    beat.cancel()

    async def _drain(self) -> AsyncIterator[pb.ConnectRequest]:
        while True:
            yield await self._outbox.get()

    async def _heartbeat(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self._outbox.put_nowait(pb.ConnectRequest(heartbeat=pb.Heartbeat()))

    def _start(self, assignment: pb.Assignment) -> None:
        cancel = threading.Event()
        task = asyncio.create_task(self._run(assignment, cancel), name=f"job-{assignment.job_id}")
        self._running[assignment.job_id] = Running(assignment.attempt, cancel, task)

    def _abandon_all(self) -> None:
        """The scheduler requeues what this worker held; stop burning the GPU on it."""
        for running in self._running.values():
            running.cancel.set()
            running.task.cancel()
        self._running.clear()

    async def _run(self, assignment: pb.Assignment, cancel: threading.Event) -> None:
        job_id, attempt = assignment.job_id, assignment.attempt
        outbox = self._outbox
        loop = asyncio.get_running_loop()

        def on_step(step: int, total: int) -> None:
            msg = pb.ConnectRequest(
                progress=pb.JobProgress(job_id=job_id, attempt=attempt, step=step, total_steps=total)
            )
            loop.call_soon_threadsafe(outbox.put_nowait, msg)

        spec = spec_from_pb(assignment.text_to_image)
        attributes: dict[str, str | int] = {
            "kiln.job": f"jobs/{job_id}",
            "kiln.attempt": attempt,
            "kiln.model": assignment.model,
            "kiln.worker": self.worker_id,
            "kiln.width": spec.width,
            "kiln.height": spec.height,
            "kiln.steps": spec.steps,
            "kiln.num_images": spec.num_images,
        }
        with tracer(__name__).start_as_current_span(
            "run", context=context_from(assignment.traceparent), attributes=attributes
        ) as span:
            try:
                images = await self._runner.run(assignment.model, spec, on_step, cancel)
            except Cancelled as exc:
                span.set_attribute("kiln.outcome", "cancelled")
                outbox.put_nowait(
                    pb.ConnectRequest(
                        cancelled=pb.JobCancelled(job_id=job_id, attempt=attempt, step=exc.step)
                    )
                )
            except ModelLoadError as exc:
                span.set_status(StatusCode.ERROR, "MODEL_LOAD_FAILED")
                error = JobError("UNAVAILABLE", str(exc), "MODEL_LOAD_FAILED", {"model": assignment.model})
                self._fail(outbox, job_id, attempt, error)
            except Exception as exc:
                log.exception("job %s attempt %d failed", job_id, attempt)
                span.record_exception(exc)
                span.set_status(StatusCode.ERROR, "PIPELINE_ERROR")
                self._fail(
                    outbox, job_id, attempt, JobError("INTERNAL", "the pipeline failed", "PIPELINE_ERROR")
                )
            else:
                if cancel.is_set():  # cancelled while the images were decoded: don't send them
                    span.set_attribute("kiln.outcome", "cancelled")
                    done = pb.JobCancelled(job_id=job_id, attempt=attempt, step=spec.steps)
                    outbox.put_nowait(pb.ConnectRequest(cancelled=done))
                else:
                    span.set_attribute("kiln.outcome", "succeeded")
                    self._send_images(outbox, job_id, attempt, images)
            finally:
                running = self._running.get(job_id)
                if running is not None and running.attempt == attempt:
                    del self._running[job_id]

    @staticmethod
    def _fail(outbox: asyncio.Queue[pb.ConnectRequest], job_id: str, attempt: int, error: JobError) -> None:
        outbox.put_nowait(
            pb.ConnectRequest(failed=pb.JobFailed(job_id=job_id, attempt=attempt, error=error_to_pb(error)))
        )

    @staticmethod
    def _send_images(
        outbox: asyncio.Queue[pb.ConnectRequest], job_id: str, attempt: int, images: list[Image]
    ) -> None:
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
