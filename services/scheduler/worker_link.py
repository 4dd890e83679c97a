"""One worker's stream: hand it jobs while it has free slots, and record what it reports.

Every report carries the job's attempt; the store ignores reports from an attempt that is no
longer current, so a late message from a worker that lost its lease changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field

from libs.jobs import Artifact, JobError, JobRecord
from libs.telemetry import context_from, traceparent_of, tracer
from services.scheduler.hub import Hub
from services.scheduler.queues import Queues, queued
from services.scheduler.store import JobStore, Outcome

log = logging.getLogger(__name__)


@dataclass
class ActiveJob:
    record: JobRecord
    attempt: int
    chunks: dict[int, bytearray] = field(default_factory=dict)

    @property
    def tenant(self) -> str:
        return self.record.tenant

    @property
    def job_id(self) -> str:
        return self.record.id


@dataclass(frozen=True)
class AssignJob:
    record: JobRecord
    attempt: int
    lease_expire_ms: int
    traceparent: str


@dataclass(frozen=True)
class CancelJob:
    job_id: str
    attempt: int


Outgoing = AssignJob | CancelJob


class WorkerLink:
    """Transport-free: the servicer feeds it decoded reports and drains `outbox`."""

    def __init__(
        self,
        *,
        worker_id: str,
        models: list[str],
        slots: int,
        store: JobStore,
        queues: Queues,
        hub: Hub,
        lease_ms: int,
        poll_s: float,
    ) -> None:
        self.worker_id = worker_id
        self.models = models
        self.outbox: asyncio.Queue[Outgoing] = asyncio.Queue()
        self._credits = slots
        self._store = store
        self._queues = queues
        self._hub = hub
        self._lease_ms = lease_ms
        self._poll_s = poll_s
        self._active: dict[str, ActiveJob] = {}
        self._poked = asyncio.Event()

    # Hub callbacks ------------------------------------------------------------------------------
    def poke(self) -> None:
        self._poked.set()

    def cancel(self, tenant: str, job_id: str) -> None:
        job = self._active.get(job_id)
        if job is not None and job.tenant == tenant:
            self.outbox.put_nowait(CancelJob(job_id, job.attempt))

    # Dispatch -----------------------------------------------------------------------------------
    async def dispatch_forever(self) -> None:
        while True:
            self._poked.clear()
            while self._credits > 0 and await self._assign_next():
                pass
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poked.wait(), timeout=self._poll_s)

    async def _assign_next(self) -> bool:
        claim = await self._queues.claim(self.worker_id, self.models, self._lease_ms)
        if claim is None:
            return False
        started = await self._store.start(claim.tenant, claim.job_id, claim.attempt, self.worker_id)
        if not started.ok:
            # Cancelled (or otherwise ended) while it sat in the queue: never run it.
            await self._queues.release(claim.tenant, claim.job_id, claim.attempt, finished=True)
            return True
        record = await self._store.get(claim.tenant, claim.job_id)
        self._credits -= 1
        self._active[claim.job_id] = ActiveJob(record, claim.attempt)
        self._hub.running(claim.tenant, claim.job_id, self)
        self.outbox.put_nowait(
            AssignJob(
                record, claim.attempt, claim.lease_expire_ms, self._trace_queue_wait(record, claim.attempt)
            )
        )
        return True

    def _trace_queue_wait(self, record: JobRecord, attempt: int) -> str:
        """A span from creation to dispatch, in the job's trace; the worker's span hangs off it."""
        span = tracer(__name__).start_span(
            "queued",
            context=context_from(record.traceparent),
            start_time=record.create_ms * 1_000_000,
            attributes={
                "kiln.job": record.name,
                "kiln.attempt": attempt,
                "kiln.model": record.model,
                "kiln.worker": self.worker_id,
            },
        )
        span.end()
        return traceparent_of(span)

    # Reports ------------------------------------------------------------------------------------
    def _current(self, job_id: str, attempt: int) -> ActiveJob | None:
        job = self._active.get(job_id)
        if job is None or job.attempt != attempt:
            log.info("ignoring report for %s attempt %d: not current on %s", job_id, attempt, self.worker_id)
            return None
        return job

    async def heartbeat(self) -> None:
        held = [(j.tenant, j.job_id, j.attempt) for j in self._active.values()]
        await self._queues.renew(self.worker_id, held, self._lease_ms)

    async def progress(self, job_id: str, attempt: int, step: int, total: int) -> None:
        job = self._current(job_id, attempt)
        if job is not None:
            await self._store.progress(job.tenant, job_id, attempt, step, total)

    def chunk(self, job_id: str, attempt: int, index: int, data: bytes) -> None:
        job = self._current(job_id, attempt)
        if job is not None:
            job.chunks.setdefault(index, bytearray()).extend(data)

    async def completed(self, job_id: str, attempt: int, images: list[Artifact]) -> None:
        job = self._current(job_id, attempt)
        if job is None:
            return
        stored: list[tuple[Artifact, bytes]] = []
        for image in images:
            data = bytes(job.chunks.get(image.index, b""))
            if len(data) != image.size_bytes or hashlib.sha256(data).hexdigest() != image.sha256:
                await self._end(
                    job,
                    self._store.fail(
                        job.tenant,
                        job_id,
                        attempt,
                        JobError(
                            "INTERNAL",
                            "result corrupted in transit",
                            "INVALID_OUTPUT",
                            {"index": str(image.index)},
                        ),
                    ),
                )
                return
            stored.append((image, data))
        await self._end(job, self._store.succeed(job.tenant, job_id, attempt, stored))

    async def failed(self, job_id: str, attempt: int, error: JobError) -> None:
        job = self._current(job_id, attempt)
        if job is not None:
            await self._end(job, self._store.fail(job.tenant, job_id, attempt, error))

    async def cancelled(self, job_id: str, attempt: int, step: int) -> None:
        job = self._current(job_id, attempt)
        if job is not None:
            await self._end(job, self._store.cancelled(job.tenant, job_id, attempt, step))

    async def _end(self, job: ActiveJob, record_outcome: Awaitable[Outcome]) -> None:
        try:
            await record_outcome
            await self._queues.release(job.tenant, job.job_id, job.attempt, finished=True)
        finally:
            self._active.pop(job.job_id, None)
            self._hub.finished(job.tenant, job.job_id)
            self._credits += 1
            self.poke()

    async def close(self) -> None:
        """The worker went away: its unfinished jobs go back to the head of their queues."""
        for job in list(self._active.values()):
            moved = await self._store.back_to_queue(job.tenant, job.job_id, job.attempt)
            if moved.ok:
                await self._queues.requeue(job.attempt, queued(job.record))
            self._hub.finished(job.tenant, job.job_id)
        self._active.clear()
