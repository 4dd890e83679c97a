"""The job store: jobs, their event streams and artifacts in Redis, changed only by Lua scripts."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from libs import redis_keys as keys
from libs.errors import FailedPrecondition, InvalidArgument, NotFound, RequestIdReused
from libs.jobs import Artifact, AttemptOutcome, JobError, JobRecord, Route, State, TextToImage, new_job_id
from libs.ratelimit import CU_POLICIES
from services.scheduler import records
from services.scheduler.admission import Terms, refusal
from services.scheduler.scripts import Scripts

REQUEST_ID_TTL_S = 24 * 3600
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50
FIRST_EVENT_ID = "0-1"
_JOB_ID = re.compile(rb"[0-9a-z]{26}")
_EVENT_ID = re.compile(r"(\d{1,20})-(\d{1,20})")
TERMINAL = ",".join(s.value for s in State if s.terminal)


@dataclass(frozen=True)
class Outcome:
    """What a fenced transition found: OK, or why not (STATE, STALE, MISSING, CANCEL_REQUESTED)
    with the state or attempt that refused it."""

    status: str
    detail: str

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    @property
    def gone(self) -> bool:
        """Refused because the job has ended or no longer exists: its lease can be let go."""
        return self.status == "MISSING" or (self.status == "STATE" and self.detail in TERMINAL.split(","))


def _check_event_id(event_id: str) -> None:
    match = _EVENT_ID.fullmatch(event_id) if event_id else None
    if event_id and (match is None or any(int(part) >= 2**64 for part in match.groups())):
        raise InvalidArgument.field(
            "after_event_id",
            f"must be an event id from this job's stream, like 1700000000000-0, got {event_id[:60]!r}",
        )


class JobStore:
    def __init__(self, redis: Redis, scripts: Scripts, *, job_ttl_s: int, artifact_ttl_s: int) -> None:
        self._redis = redis
        self._scripts = scripts
        self._job_ttl_s = job_ttl_s
        self._artifact_ttl_s = artifact_ttl_s

    async def create(
        self,
        tenant: str,
        model: str,
        spec: TextToImage,
        terms: Terms,
        *,
        request_id: str = "",
        api_key_id: str = "",
        fingerprint: str = "",
        traceparent: str = "",
        queue_timeout_ms: int = 0,
        job_id: str = "",
    ) -> tuple[JobRecord, bool]:
        """Admits and creates the job under `terms`, or raises the refusal; returns the job and
        whether it is new (False: replayed for the same request_id and API key, not charged again)."""
        job_id = job_id or new_job_id()
        fingerprint = (
            fingerprint
            or hashlib.sha256(
                json.dumps([model, dataclasses.asdict(spec)], sort_keys=True).encode()
            ).hexdigest()
        )
        fields = records.new_job_fields(
            job_id, tenant, model, spec, traceparent, terms.tier, queue_timeout_ms, terms.policies
        )
        flat = [item for pair in fields.items() for item in pair]
        request_key = keys.request_id(tenant, api_key_id, request_id) if request_id else ""
        status, found_id = await self._admit(tenant, job_id, terms, request_key, fingerprint, flat)
        if status == "MISMATCH":
            raise RequestIdReused(
                f"request_id {request_id!r} was already used for a different job (jobs/{found_id}); "
                "send a new request_id for a new job",
                metadata={"request_id": request_id, "job": f"jobs/{found_id}"},
            )
        # Job ids carry 80 random bits, so an existing one is this very call run twice: the Redis
        # client resends a command whose reply a dropped connection lost. The first run charged.
        return await self.get(tenant, found_id), status in ("CREATED", "DUPLICATE_ID")

    async def replayed(self, tenant: str, api_key_id: str, request_id: str) -> bool:
        """Whether `request_id` from this API key already made a job (create then returns it,
        whatever the limits)."""
        return bool(await self._redis.exists(keys.request_id(tenant, api_key_id, request_id)))

    async def check(self, tenant: str, terms: Terms) -> None:
        """Raises the refusal CreateJob would meet now; writes nothing."""
        await self._admit(tenant, "", terms, "", "", [])

    async def _admit(
        self, tenant: str, job_id: str, terms: Terms, request_key: str, fingerprint: str, fields: list[str]
    ) -> tuple[str, str]:
        """Runs the create script (a dry run for an empty job id); raises its refusals.
        `request_key` is the request id's Redis key, or empty when the call has none."""
        result = await self._scripts.create_job(
            keys=[
                keys.job(tenant, job_id or "dry-run"),
                keys.job_events(tenant, job_id or "dry-run"),
                keys.tenant_jobs(tenant),
                request_key or keys.request_id(tenant, "", ""),  # a dummy in the slot when unused
                keys.usage(tenant),
                *(keys.rate_policy(tenant, p.name) for p in terms.policies),
            ],
            args=[
                job_id,
                str(REQUEST_ID_TTL_S if request_key else 0),
                fingerprint,
                str(terms.cost),
                str(terms.max_in_flight),
                str(terms.max_queued_cu),
                str(len(terms.policies)),
                *(arg for p in terms.policies for arg in p.args()),
                *fields,
            ],
        )
        status, found_id, *refused = (v.decode() for v in result)
        if status in ("LIMITED", "IN_FLIGHT", "QUEUE_FULL"):
            retry_ms, limit = refused
            raise refusal(tenant, terms, status, found_id, int(retry_ms), limit)
        return status, found_id

    async def get(self, tenant: str, job_id: str) -> JobRecord:
        raw: dict[bytes, bytes] = await self._redis.hgetall(keys.job(tenant, job_id))  # type: ignore[assignment]
        if not raw or b"spec" not in raw:
            raise NotFound(
                f"jobs/{job_id} not found", reason="JOB_NOT_FOUND", metadata={"name": f"jobs/{job_id}"}
            )
        return records.from_fields(records.decode(raw))

    async def list_jobs(self, tenant: str, page_size: int, page_token: str) -> tuple[list[JobRecord], str]:
        size = DEFAULT_PAGE_SIZE if page_size <= 0 else min(page_size, MAX_PAGE_SIZE)
        start = b"+"
        if page_token:
            try:
                after = base64.urlsafe_b64decode(page_token.encode())
            except (binascii.Error, ValueError):
                after = b""
            if not _JOB_ID.fullmatch(after):
                raise InvalidArgument.field("page_token", "is not a token returned by ListJobs")
            start = b"(" + after
        ids: list[bytes] = await self._redis.zrange(  # type: ignore[assignment]
            keys.tenant_jobs(tenant), start, b"-", bylex=True, desc=True, offset=0, num=size
        )
        jobs: list[JobRecord] = []
        if ids:
            pipe = self._redis.pipeline(transaction=False)
            for raw_id in ids:
                pipe.hgetall(keys.job(tenant, raw_id.decode()))
            for raw_id, raw in zip(ids, await pipe.execute(), strict=True):
                if raw and b"spec" in raw:
                    jobs.append(records.from_fields(records.decode(raw)))
                else:  # expired: drop the dangling index entry
                    await self._redis.zrem(keys.tenant_jobs(tenant), raw_id)
        token = base64.urlsafe_b64encode(ids[-1]).decode() if len(ids) == size else ""
        return jobs, token

    async def transition(
        self,
        tenant: str,
        job_id: str,
        *,
        attempt: str = "",
        allowed: str,
        new_state: State | None = None,
        stamp: str = "",
        fields: dict[str, str] | None = None,
        blobs: Sequence[tuple[str, bytes]] = (),
        unless_cancel_requested: bool = False,
        attempt_open: str = "",
        attempt_close: str = "",
        refund: bool = False,
    ) -> Outcome:
        """One fenced change (lua/transition.lua). `refund` gives the job's compute units back to
        the rate policies, once, when the change ends the job."""
        terminal = new_state is not None and new_state.terminal
        flat = [item for pair in (fields or {}).items() for item in pair]
        refund_keys = [keys.rate_policy(tenant, name) for name in CU_POLICIES] if refund else []
        result = await self._scripts.transition(
            keys=[
                keys.job(tenant, job_id),
                keys.job_events(tenant, job_id),
                keys.usage(tenant),
                *refund_keys,
                *(k for k, _ in blobs),
            ],
            args=[
                attempt,
                allowed,
                new_state.value if new_state else "",
                stamp,
                str(self._job_ttl_s if terminal else 0),
                "1" if unless_cancel_requested else "0",
                str(self._artifact_ttl_s),
                attempt_open,
                attempt_close,
                str(len(refund_keys)),
                str(len(blobs)),
                *(b for _, b in blobs),
                *flat,
            ],
        )
        status, detail = (v.decode() for v in result)
        return Outcome(status, detail)

    async def end_queued(
        self, tenant: str, job_id: str, state: State, error: JobError, *, dead_letter: bool = False
    ) -> Outcome:
        """Ends a job that is not on a worker (cancelled, expired, or its model cannot load
        anywhere); it never finished running, so its compute units are refunded."""
        return await self.transition(
            tenant,
            job_id,
            allowed=State.QUEUED.value,
            new_state=state,
            stamp="end_ms",
            fields={"error": records.error_field(error), "dead_letter": "1" if dead_letter else ""},
            refund=True,
        )

    async def cancel(self, tenant: str, job_id: str) -> tuple[JobRecord, bool]:
        """Cancels a queued job outright; flags a running one. Returns (job, was_running)."""
        cancelled = JobError("CANCELLED", "cancelled by the client", "CANCELLED")
        outcome = await self.end_queued(tenant, job_id, State.CANCELLED, cancelled)
        running = False
        if not outcome.ok and outcome.detail == State.RUNNING.value:
            outcome = await self.transition(
                tenant, job_id, allowed=State.RUNNING.value, fields={"cancel_requested": "1"}
            )
            running = outcome.ok
        if not outcome.ok and outcome.detail in TERMINAL.split(","):
            raise FailedPrecondition(
                f"jobs/{job_id} already ended in state {outcome.detail}",
                reason="JOB_ALREADY_ENDED",
                metadata={"name": f"jobs/{job_id}", "state": outcome.detail},
            )
        if not outcome.ok and outcome.detail == "":
            await self.get(tenant, job_id)  # raises NotFound
        return await self.get(tenant, job_id), running

    async def start(self, tenant: str, job_id: str, attempt: int, worker_id: str, route: Route) -> Outcome:
        return await self.transition(
            tenant,
            job_id,
            attempt=f"<{attempt}",
            allowed=State.QUEUED.value,
            new_state=State.RUNNING,
            stamp="start_ms",
            fields={"attempt": str(attempt), "worker": worker_id, "step": "0"},
            attempt_open=records.attempt_open(attempt, worker_id, route),
        )

    async def progress(self, tenant: str, job_id: str, attempt: int, step: int, total: int) -> Outcome:
        return await self.transition(
            tenant,
            job_id,
            attempt=f"={attempt}",
            allowed=State.RUNNING.value,
            fields={"step": str(step), "total_steps": str(total)},
        )

    async def succeed(
        self, tenant: str, job_id: str, attempt: int, images: list[tuple[Artifact, bytes]]
    ) -> Outcome:
        """Stores the images and ends the job, unless a cancel was accepted meanwhile: then the job
        ends CANCELLED and the images are dropped, as the client was told."""
        outcome = await self.transition(
            tenant,
            job_id,
            attempt=f"={attempt}",
            allowed=State.RUNNING.value,
            new_state=State.SUCCEEDED,
            stamp="end_ms",
            fields={"artifacts": records.artifacts_field([a for a, _ in images])},
            blobs=[(keys.artifact(tenant, job_id, a.index), data) for a, data in images],
            unless_cancel_requested=True,
            attempt_close=records.attempt_close(AttemptOutcome.SUCCEEDED),
        )
        if outcome.status != "CANCEL_REQUESTED":
            return outcome
        record = await self.get(tenant, job_id)
        return await self.cancelled(tenant, job_id, attempt, record.step)

    async def fail(
        self, tenant: str, job_id: str, attempt: int, error: JobError, *, dead_letter: bool = False
    ) -> Outcome:
        """Ends the job FAILED; no images came of it, so its compute units are refunded."""
        return await self.transition(
            tenant,
            job_id,
            attempt=f"={attempt}",
            allowed=State.RUNNING.value,
            new_state=State.FAILED,
            stamp="end_ms",
            fields={"error": records.error_field(error), "dead_letter": "1" if dead_letter else ""},
            attempt_close=records.attempt_close(AttemptOutcome.FAILED, error),
            refund=True,
        )

    async def cancelled(self, tenant: str, job_id: str, attempt: int, step: int) -> Outcome:
        error = JobError("CANCELLED", f"cancelled by the client after step {step}", "CANCELLED")
        return await self.transition(
            tenant,
            job_id,
            attempt=f"={attempt}",
            allowed=State.RUNNING.value,
            new_state=State.CANCELLED,
            stamp="end_ms",
            fields={"error": records.error_field(error), "step": str(step)},
            attempt_close=records.attempt_close(AttemptOutcome.CANCELLED, error),
        )

    async def retry(
        self,
        tenant: str,
        job_id: str,
        attempt: int,
        error: JobError | None,
        *,
        route: Route,
        failures: dict[str, int],
        min_vram_bytes: int = 0,
    ) -> Outcome:
        """Puts a job its worker failed on, or handed back (`error` None), back in the QUEUED state
        for another attempt along `route`."""
        return await self.transition(
            tenant,
            job_id,
            attempt=f"={attempt}",
            allowed=State.RUNNING.value,
            new_state=State.QUEUED,
            fields={
                "step": "0",
                "worker": "",
                "route": route.value,
                "failures": records.failures_field(failures),
                "min_vram_bytes": str(min_vram_bytes),
            },
            attempt_close=records.attempt_close(
                AttemptOutcome.RELEASED if error is None else AttemptOutcome.FAILED, error
            ),
        )

    async def reopen(self, tenant: str, job_id: str) -> Outcome:
        """A dead letter an operator requeues: FAILED to QUEUED, its failure counts reset."""
        return await self.transition(
            tenant,
            job_id,
            allowed=State.FAILED.value,
            new_state=State.QUEUED,
            fields={
                "error": "",
                "end_ms": "0",
                "step": "0",
                "worker": "",
                "dead_letter": "",
                "route": Route.STANDARD.value,
                "failures": "{}",
                "min_vram_bytes": "0",
            },
        )

    async def events(
        self, tenant: str, job_id: str, after: str, block_ms: int
    ) -> AsyncIterator[tuple[str, JobRecord]]:
        """Yields (event id, snapshot) after `after`; ends after the terminal snapshot, or at once
        when the job already ended before `after`."""
        _check_event_id(after)
        record = await self.get(tenant, job_id)
        stream, job_key = keys.job_events(tenant, job_id), keys.job(tenant, job_id)
        last = after or "0-0"
        if last == "0-0" and record.state is State.QUEUED and not await self._redis.exists(stream):
            # Not yet changed since it was created, so it has no stream: its first event is the
            # record itself, under the id the first transition will give it.
            last = FIRST_EVENT_ID
            yield last, record
        block: int | None = None  # the first read never waits: there may be nothing left to wait for
        while True:
            reply: Any = await self._redis.xread({stream: last}, block=block, count=100)
            for _, entries in reply:
                for raw_id, raw in entries:
                    last = raw_id.decode()
                    record = records.from_fields(records.decode(raw))
                    yield last, record
                    if record.state.terminal:
                        return
            if not reply:
                state: bytes | None = await self._redis.hget(job_key, "state")  # type: ignore[assignment]
                if state is None:
                    # Gone while watched (expired, or a Redis without AOF restarted): not a finish.
                    await self.get(tenant, job_id)  # raises NotFound
                if state is None or State(state.decode()).terminal:
                    # Ended (or expired) with nothing after `last`, or its terminal event came in
                    # after our read: the non-blocking read next time round delivers it, then ends.
                    if block is None:
                        return
                    block = None
                    continue
            block = block_ms

    async def artifact_chunks(self, tenant: str, job_id: str, index: int, chunk: int) -> AsyncIterator[bytes]:
        key = keys.artifact(tenant, job_id, index)
        size = int(await self._redis.strlen(key))
        if not size:
            raise NotFound(
                f"jobs/{job_id}/artifacts/{index} not found",
                reason="ARTIFACT_NOT_FOUND",
                metadata={"name": f"jobs/{job_id}/artifacts/{index}"},
            )
        for offset in range(0, size, chunk):
            data: bytes = await self._redis.getrange(key, offset, min(offset + chunk, size) - 1)  # type: ignore[assignment]
            yield data
