"""gRPC edge of the worker link: decodes worker messages into `WorkerLink` calls, encodes its outbox."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from kiln.worker.v1 import worker_service_pb2 as pb
from kiln.worker.v1 import worker_service_pb2_grpc as pb_grpc

from libs.convert import error_from_pb, spec_to_pb
from libs.jobs import Artifact
from libs.settings import SchedulerSettings
from services.scheduler.hub import Hub
from services.scheduler.queues import Queues
from services.scheduler.store import JobStore
from services.scheduler.worker_link import AssignJob, WorkerLink

log = logging.getLogger(__name__)


class WorkerService(pb_grpc.WorkerServiceServicer):
    def __init__(self, store: JobStore, queues: Queues, hub: Hub, settings: SchedulerSettings) -> None:
        self._store = store
        self._queues = queues
        self._hub = hub
        self._settings = settings
        self._closing: set[asyncio.Task[None]] = set()

    # Uses context.read()/write() rather than an async generator: reads and writes run in
    # separate tasks, and the stubs only describe the generator form.
    async def Connect(  # type: ignore[override]
        self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        first = await context.read()
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "register":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the first message must be register")
        reg = first.register
        link = WorkerLink(
            worker_id=reg.worker_id,
            models=list(reg.models),
            slots=max(1, reg.slots),
            store=self._store,
            queues=self._queues,
            hub=self._hub,
            lease_ms=int(self._settings.lease_seconds * 1000),
            poll_s=self._settings.dispatch_poll_seconds,
        )
        log.info(
            "worker %s connected: models=%s device=%s slots=%d",
            reg.worker_id,
            list(reg.models),
            reg.device,
            reg.slots,
        )
        await context.write(
            pb.ConnectResponse(
                registered=pb.Registered(heartbeat_interval_ms=self._settings.heartbeat_interval_ms)
            )
        )
        self._hub.attach(link)
        tasks = [
            asyncio.create_task(self._read(link, context), name=f"read-{reg.worker_id}"),
            asyncio.create_task(link.dispatch_forever(), name=f"dispatch-{reg.worker_id}"),
            asyncio.create_task(self._write(link, context), name=f"write-{reg.worker_id}"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    log.warning("worker %s link ended: %r", reg.worker_id, task.exception())
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._hub.detach(link)
            # Requeueing must finish even if this handler is being cancelled; `drain` awaits it.
            closing = asyncio.create_task(link.close(), name=f"close-{reg.worker_id}")
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(closing)
            log.info("worker %s disconnected", reg.worker_id)

    async def drain(self) -> None:
        """Waits for disconnected workers' jobs to be requeued."""
        await asyncio.gather(*self._closing, return_exceptions=True)

    async def _read(self, link: WorkerLink, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        while True:
            msg = await context.read()
            if msg is grpc.aio.EOF:
                return
            kind = msg.WhichOneof("kind")
            if kind == "heartbeat":
                await link.heartbeat()
            elif kind == "progress":
                p = msg.progress
                await link.progress(p.job_id, p.attempt, p.step, p.total_steps)
            elif kind == "chunk":
                c = msg.chunk
                link.chunk(c.job_id, c.attempt, c.index, c.data)
            elif kind == "completed":
                done = msg.completed
                images = [
                    Artifact(i.index, i.mime_type, i.size_bytes, i.sha256, i.seed, i.width, i.height)
                    for i in done.images
                ]
                await link.completed(done.job_id, done.attempt, images)
            elif kind == "failed":
                await link.failed(msg.failed.job_id, msg.failed.attempt, error_from_pb(msg.failed.error))
            elif kind == "cancelled":
                c2 = msg.cancelled
                await link.cancelled(c2.job_id, c2.attempt, c2.step)

    async def _write(self, link: WorkerLink, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        while True:
            out = await link.outbox.get()
            if isinstance(out, AssignJob):
                await context.write(pb.ConnectResponse(assignment=_assignment(out)))
            else:
                await context.write(
                    pb.ConnectResponse(cancel=pb.CancelAssignment(job_id=out.job_id, attempt=out.attempt))
                )


def _assignment(out: AssignJob) -> pb.Assignment:
    expire = timestamp_pb2.Timestamp()
    expire.FromMilliseconds(out.lease_expire_ms)
    return pb.Assignment(
        job_id=out.record.id,
        attempt=out.attempt,
        model=out.record.model,
        text_to_image=spec_to_pb(out.record.spec),
        lease_expire_time=expire,
        traceparent=out.traceparent,
    )
