"""One worker's stream: hand it jobs while it has room, and record what it reports.

Every report carries the job's attempt; the store ignores reports from an attempt that is no
longer current, so a late message from a worker that lost its lease changes nothing. Heartbeats
keep the leases of the jobs the worker says it holds; a lease it no longer holds comes back to it
as a cancel, so it stops spending the GPU on a job that now runs elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass, field

from libs.errors import NotFound
from libs.jobs import Artifact, JobError, JobRecord, Route, State
from libs.telemetry import context_from, traceparent_of, tracer
from services.scheduler.hub import Hub
from services.scheduler.outage import UNREACHABLE
from services.scheduler.queues import Queues
from services.scheduler.recovery import Recovery
from services.scheduler.registry import Registry, WorkerInfo
from services.scheduler.store import JobStore

log = logging.getLogger(__name__)


@dataclass
class ActiveJob:
    record: JobRecord
    attempt: int
    assigned_s: float
    started: bool = False
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
    route: Route
    execution_timeout_ms: int


@dataclass(frozen=True)
class CancelJob:
    job_id: str
    attempt: int


Outgoing = AssignJob | CancelJob


@dataclass(frozen=True)
class LinkConfig:
    lease_ms: int
    poll_s: float
    heartbeat_s: float
    execution_timeout_ms: int


class WorkerLink:
    """Transport-free: the servicer feeds it decoded reports and drains `outbox`."""

    def __init__(
        self,
        info: WorkerInfo,
        *,
        capacity: int,
        store: JobStore,
        queues: Queues,
        hub: Hub,
        recovery: Recovery,
        registry: Registry,
        config: LinkConfig,
    ) -> None:
        self.info = info
        self.outbox: asyncio.Queue[Outgoing] = asyncio.Queue()
        self._credits = capacity
        self._store = store
        self._queues = queues
        self._hub = hub
        self._recovery = recovery
        self._registry = registry
        self._config = config
        self._active: dict[str, ActiveJob] = {}
        self._poked = asyncio.Event()
        self.draining = False

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    # Hub callbacks ------------------------------------------------------------------------------
    def poke(self) -> None:
        self._poked.set()

    def cancel(self, tenant: str, job_id: str) -> None:
        job = self._active.get(job_id)
        if job is not None and job.tenant == tenant:
            self.outbox.put_nowait(CancelJob(job_id, job.attempt))

    # Dispatch -----------------------------------------------------------------------------------
    async def dispatch_forever(self) -> None:
        reported = False
        while True:
            self._poked.clear()
            try:
                if not reported:
                    await self._registry.report(self.info)
                    reported = True
                while self._credits > 0 and not self.draining and await self._assign_next():
                    pass
            except UNREACHABLE as exc:
                # Nothing was handed out that the store does not know of: a claim whose start was
                # lost keeps its lease, and the reaper puts it back in line.
                log.warning("dispatch to %s paused: Redis unreachable (%s)", self.worker_id, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poked.wait(), timeout=self._config.poll_s)

    async def _assign_next(self) -> bool:
        claim = await self._queues.claim(
            self.worker_id, self.info.models, self._config.lease_ms, self.info.vram_free_bytes
        )
        if claim is None:
            return False
        try:
            record = await self._store.get(claim.tenant, claim.job_id)
        except NotFound:
            await self._queues.release(claim.tenant, claim.job_id, claim.attempt, finished=True)
            return True
        started = await self._store.start(
            claim.tenant, claim.job_id, claim.attempt, self.worker_id, record.route
        )
        if not started.ok:
            # Cancelled (or otherwise ended) while it waited: never run it.
            await self._queues.release(claim.tenant, claim.job_id, claim.attempt, finished=True)
            return True
        record = dataclasses.replace(record, state=State.RUNNING, attempt=claim.attempt)
        self._credits -= 1
        self._active[claim.job_id] = ActiveJob(record, claim.attempt, time.monotonic())
        self._hub.running(claim.tenant, claim.job_id, self)
        self.outbox.put_nowait(
            AssignJob(
                record,
                claim.attempt,
                claim.lease_expire_ms,
                self._trace_queue_wait(record, claim.attempt),
                record.route,
                self._config.execution_timeout_ms,
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
                "kiln.route": record.route.value,
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

    async def heartbeat(self, held: list[tuple[str, int]], info: WorkerInfo) -> None:
        """Renews what the worker says it holds and we handed it; what it lost goes back to it as a
        cancel, and what it does not hold any more (well after handing it over) is forgotten, its
        lease left to expire."""
        self.info = info
        await self._registry.report(info)
        reported = set(held)
        renew = []
        now = time.monotonic()
        for job in list(self._active.values()):
            if (job.job_id, job.attempt) in reported:
                renew.append((job.tenant, job.job_id, job.attempt))
            elif now - job.assigned_s > 2 * self._config.heartbeat_s:
                log.warning("worker %s no longer holds jobs/%s", self.worker_id, job.job_id)
                self._forget(job)
        for tenant, job_id, attempt in await self._queues.renew(self.worker_id, renew, self._config.lease_ms):
            log.warning("jobs/%s attempt %d lost its lease on %s", job_id, attempt, self.worker_id)
            self.outbox.put_nowait(CancelJob(job_id, attempt))
            lost = self._active.get(job_id)
            if lost is not None and lost.attempt == attempt and lost.tenant == tenant:
                self._forget(lost)

    async def progress(self, job_id: str, attempt: int, step: int, total: int) -> None:
        job = self._current(job_id, attempt)
        if job is not None:
            job.started = True
            if step > 0:  # step 0 only says the run began: the job already shows RUNNING at step 0
                await self._store.progress(job.tenant, job_id, attempt, step, total)

    def chunk(self, job_id: str, attempt: int, index: int, data: bytes) -> None:
        job = self._current(job_id, attempt)
        if job is not None:
            job.chunks.setdefault(index, bytearray()).extend(data)

    async def completed(self, job_id: str, attempt: int, images: list[Artifact]) -> None:
        job = self._current(job_id, attempt)
        if job is None:
            return
        if sorted(image.index for image in images) != list(range(job.record.spec.num_images)):
            error = JobError(
                "INTERNAL",
                f"the worker sent images {sorted(i.index for i in images)} for a job of "
                f"{job.record.spec.num_images} image(s)",
                "RESULT_CORRUPTED",
                {"images": str(len(images))},
            )
            await self.failed(job_id, attempt, error)
            return
        stored: list[tuple[Artifact, bytes]] = []
        for image in images:
            data = bytes(job.chunks.get(image.index, b""))
            if len(data) != image.size_bytes or hashlib.sha256(data).hexdigest() != image.sha256:
                error = JobError(
                    "INTERNAL", "result corrupted in transit", "RESULT_CORRUPTED", {"index": str(image.index)}
                )
                await self.failed(job_id, attempt, error)
                return
            stored.append((image, data))
        outcome = await self._store.succeed(job.tenant, job_id, attempt, stored)
        if outcome.ok:
            log.info("accepted result of jobs/%s attempt %d from %s", job_id, attempt, self.worker_id)
        await self._queues.release(job.tenant, job_id, attempt, finished=True)
        self._forget(job)

    async def failed(self, job_id: str, attempt: int, error: JobError) -> None:
        job = self._current(job_id, attempt)
        if job is None:
            return
        await self._recovery.failed(await self._store.get(job.tenant, job_id), attempt, error)
        self._forget(job)

    async def cancelled(self, job_id: str, attempt: int, step: int) -> None:
        job = self._current(job_id, attempt)
        if job is None:
            return
        outcome = await self._store.cancelled(job.tenant, job_id, attempt, step)
        if outcome.ok or outcome.gone:
            await self._queues.release(job.tenant, job_id, attempt, finished=True)
        self._forget(job)

    async def released(self, job_id: str, attempt: int) -> None:
        job = self._current(job_id, attempt)
        if job is None:
            return
        await self._recovery.release(await self._store.get(job.tenant, job_id), attempt)
        self._forget(job)

    def drain(self) -> None:
        """The worker is shutting down: hand it nothing more."""
        self.draining = True

    def _forget(self, job: ActiveJob) -> None:
        if self._active.get(job.job_id) is job:
            del self._active[job.job_id]
            self._hub.finished(job.tenant, job.job_id, self)
            self._credits += 1
            self.poke()

    async def close(self, *, shutting_down: bool = False) -> None:
        """The stream ended. Jobs the worker had started count a crash against them (it may have
        died of one), unless this scheduler or the worker was shutting down; the rest go back for
        free."""
        for job in list(self._active.values()):
            try:
                record = await self._store.get(job.tenant, job.job_id)
            except NotFound:
                await self._queues.release(job.tenant, job.job_id, job.attempt, finished=True)
                continue
            if record.state is State.RUNNING and record.attempt == job.attempt:
                # A worker that said it was draining and ran out of time did not crash.
                started = job.started and not shutting_down and not self.draining
                await self._recovery.lost(record, job.attempt, self.worker_id, started=started)
            self._hub.finished(job.tenant, job.job_id, self)
        self._active.clear()
        await self._registry.forget(self.worker_id)
