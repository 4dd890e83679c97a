"""gRPC edge of the worker link: decodes worker messages into `WorkerLink` calls, encodes its outbox."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
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
from services.scheduler.outage import until_reachable
from services.scheduler.queues import Queues
from services.scheduler.recovery import Recovery
from services.scheduler.registry import Registry, WorkerInfo
from services.scheduler.store import JobStore
from services.scheduler.worker_link import AssignJob, LinkConfig, WorkerLink

log = logging.getLogger(__name__)

MAX_PREFETCH_PER_SLOT = 4


class WorkerService(pb_grpc.WorkerServiceServicer):
    def __init__(
        self,
        store: JobStore,
        queues: Queues,
        hub: Hub,
        recovery: Recovery,
        registry: Registry,
        settings: SchedulerSettings,
    ) -> None:
        self._store = store
        self._queues = queues
        self._hub = hub
        self._recovery = recovery
        self._registry = registry
        self._config = LinkConfig(
            lease_ms=int(settings.lease_seconds * 1000),
            poll_s=settings.dispatch_poll_seconds,
            heartbeat_s=settings.heartbeat_interval_ms / 1000,
            execution_timeout_ms=int(settings.execution_timeout_seconds * 1000),
        )
        self._heartbeat_ms = settings.heartbeat_interval_ms
        # A report may wait this long for Redis: about a lease, since leases cannot be kept anyway.
        self._outage_s = settings.lease_seconds
        self._closing: set[asyncio.Task[None]] = set()
        self._links: set[WorkerLink] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self.shutting_down = False

    # Uses context.read()/write() rather than an async generator: reads and writes run in
    # separate tasks, and the stubs only describe the generator form.
    async def Connect(  # type: ignore[override]
        self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        first = await context.read()
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "register":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the first message must be register")
        if self.shutting_down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this scheduler is shutting down")
        reg = first.register
        if any(link.worker_id == reg.worker_id for link in self._links):
            # Its reports (models, VRAM, held jobs) would be mixed up with the other stream's.
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"a worker with id {reg.worker_id!r} is already connected"
            )
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
            handler.add_done_callback(self._handlers.discard)
        link = WorkerLink(
            WorkerInfo(
                worker_id=reg.worker_id,
                models=tuple(reg.models),
                failed_models={f.model: f.message for f in reg.failed_models},
                vram_total_bytes=reg.vram_total_bytes,
                vram_free_bytes=reg.vram_free_bytes,
            ),
            # Prefetch beyond a few jobs per slot only hoards work other workers could start.
            capacity=max(1, reg.slots) + min(max(0, reg.prefetch), MAX_PREFETCH_PER_SLOT * max(1, reg.slots)),
            store=self._store,
            queues=self._queues,
            hub=self._hub,
            recovery=self._recovery,
            registry=self._registry,
            config=self._config,
        )
        log.info(
            "worker %s connected: models=%s failed=%s device=%s slots=%d prefetch=%d",
            reg.worker_id,
            list(reg.models),
            [f.model for f in reg.failed_models],
            reg.device,
            reg.slots,
            reg.prefetch,
        )
        await context.write(
            pb.ConnectResponse(registered=pb.Registered(heartbeat_interval_ms=self._heartbeat_ms))
        )
        self._hub.attach(link)
        self._links.add(link)
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
            self._links.discard(link)
            # Requeueing must finish even if this handler is being cancelled; `drain` awaits it.
            closing = asyncio.create_task(
                until_reachable(
                    lambda: link.close(shutting_down=self.shutting_down),
                    within_s=self._outage_s,
                    what=f"handing back the jobs of {reg.worker_id}",
                ),
                name=f"close-{reg.worker_id}",
            )
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(closing)
            log.info("worker %s disconnected", reg.worker_id)

    def stop_dispatch(self) -> None:
        """Shutdown begins: no worker is handed anything more by this replica."""
        self.shutting_down = True
        for link in self._links:
            link.drain()

    async def drain(self) -> None:
        """Waits for every stream's handler to end and its worker's jobs to be handed back (the
        server's stop cancels the handlers; their clean-up runs after it returns)."""
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)
        await asyncio.gather(*self._closing, return_exceptions=True)

    async def _read(self, link: WorkerLink, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        while True:
            msg = await context.read()
            if msg is grpc.aio.EOF:
                return
            # While Redis is away the worker waits for this report to be recorded (its stream
            # backs up); past the outage allowance the stream ends and the worker reconnects.
            await until_reachable(
                functools.partial(self._handle, link, msg),
                within_s=self._outage_s,
                what=f"report from {link.worker_id}",
            )

    async def _handle(self, link: WorkerLink, msg: pb.ConnectRequest) -> None:
        kind = msg.WhichOneof("kind")
        if kind == "heartbeat":
            beat = msg.heartbeat
            info = dataclasses.replace(
                link.info,
                models=tuple(beat.models),
                failed_models={f.model: f.message for f in beat.failed_models},
                vram_free_bytes=beat.vram_free_bytes,
            )
            await link.heartbeat([(j.job_id, j.attempt) for j in beat.jobs], info)
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
        elif kind == "released":
            await link.released(msg.released.job_id, msg.released.attempt)
        elif kind == "draining":
            log.info("worker %s is draining", link.worker_id)
            link.drain()

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
    assignment = pb.Assignment(
        job_id=out.record.id,
        attempt=out.attempt,
        model=out.record.model,
        text_to_image=spec_to_pb(out.record.spec),
        lease_expire_time=expire,
        traceparent=out.traceparent,
        options=pb.RunOptions(memory_savers=out.route.memory_savers, full_precision=out.route.full_precision),
    )
    if out.execution_timeout_ms:
        assignment.execution_timeout.FromMilliseconds(out.execution_timeout_ms)
    return assignment
