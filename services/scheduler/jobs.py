"""What the scheduler does for the gateway: admit, look up, cancel, watch and read jobs."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass

from libs.catalog import ModelSpec
from libs.cost import compute_units
from libs.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from libs.jobs import JobRecord, TextToImage, artifact_name, new_job_id
from libs.tiers import Tier, tier_of
from services.scheduler.admission import terms
from services.scheduler.hub import Hub
from services.scheduler.queues import Queues, queued
from services.scheduler.store import JobStore

ARTIFACT_CHUNK_BYTES = 1 << 20
# Longer than any CreateJob call is waited for, so the reaper never races a slow submit.
ENQUEUE_GRACE_MS = 30_000


@dataclass(frozen=True)
class Estimate:
    cost: int
    admissible: bool
    limiting_policy: str
    retry_after_s: float
    queued_cu: int
    expected_wait_s: float  # 0 when no service rate is measured yet
    service_rate: float


class Jobs:
    def __init__(
        self,
        store: JobStore,
        queues: Queues,
        hub: Hub,
        *,
        watch_block_ms: int,
        tiers: dict[str, Tier],
        catalog: dict[str, ModelSpec],
    ) -> None:
        self._watch_block_ms = watch_block_ms
        self._tiers = tiers
        self._catalog = catalog
        self._store = store
        self._queues = queues
        self._hub = hub

    async def submit(
        self,
        tenant: str,
        tier: str,
        model: str,
        spec: TextToImage,
        *,
        request_id: str = "",
        api_key_id: str = "",
        fingerprint: str = "",
        traceparent: str = "",
        queue_timeout_ms: int = 0,
    ) -> tuple[JobRecord, bool]:
        """Admits a new job, or returns the one an earlier call with the same request id and API
        key made; returns the job and whether it was such a replay (charged nothing)."""
        cost = compute_units(spec, self._model(model).cost_factor)
        tier_config = tier_of(self._tiers, tier)
        if not (request_id and await self._store.replayed(tenant, api_key_id, request_id)):
            await self._refuse_long_waits(await self._queues.stats(model), model, tier, tier_config)
        longest = int(tier_config.max_queue_wait_s * 1000)
        # The job (its tenant's hash slot) and its place in line (the dispatch slot) are two steps:
        # the intent, written first, lets the reaper finish the second should this process die.
        job_id = new_job_id()
        intent = await self._queues.intend("enqueue", tenant, job_id, ENQUEUE_GRACE_MS)
        try:
            record, created = await self._store.create(
                tenant,
                model,
                spec,
                terms(tier, tier_config, cost),
                request_id=request_id,
                api_key_id=api_key_id,
                fingerprint=fingerprint,
                traceparent=traceparent,
                queue_timeout_ms=min(queue_timeout_ms, longest) if queue_timeout_ms > 0 else longest,
                job_id=job_id,
            )
        except BaseException:
            await self._queues.done(intent)  # refused: there is nothing to put in line
            raise
        if created:
            await self._queues.enqueue(queued(record), intent=intent)
        else:
            await self._queues.done(intent)
        return record, not created

    async def estimate(self, tenant: str, tier: str, model: str, spec: TextToImage) -> Estimate:
        tier_config = tier_of(self._tiers, tier)
        cost = compute_units(spec, self._model(model).cost_factor)
        stats = await self._queues.stats(model)
        queued_cu, rate = stats
        estimate = Estimate(cost, True, "", 0.0, queued_cu, queued_cu / rate if rate else 0.0, rate)
        try:
            await self._store.check(tenant, terms(tier, tier_config, cost))
            await self._refuse_long_waits(stats, model, tier, tier_config)
        except (ResourceExhausted, Unavailable) as refused:
            return dataclasses.replace(
                estimate,
                admissible=False,
                limiting_policy=refused.metadata.get("policy", refused.reason),
                retry_after_s=refused.retry_after_s or 0.0,
            )
        return estimate

    async def _refuse_long_waits(
        self, stats: tuple[int, float], model: str, tier: str, tier_config: Tier
    ) -> None:
        """Admission control: no job is accepted that would likely outwait its tier's limit."""
        queued_cu, rate = stats
        if not queued_cu or not rate:
            # Nothing ahead: it starts as soon as a worker is free. Nothing measured: the queue
            # timeout still bounds the wait. (The rate is of work taken on, so it sags when idle.)
            return
        wait_s = queued_cu / rate
        if wait_s > tier_config.max_queue_wait_s:
            raise Unavailable(
                f"the queue for {model} would take about {wait_s:.0f} s, more than the {tier} tier's "
                f"{tier_config.max_queue_wait_s:g} s; retry later",
                reason="EXPECTED_WAIT_TOO_LONG",
                metadata={"policy": "max_queue_wait_s", "expected_wait_s": f"{wait_s:.1f}", "tier": tier},
                retry_after_s=wait_s - tier_config.max_queue_wait_s,
            )

    def _model(self, model: str) -> ModelSpec:
        spec = self._catalog.get(model)
        if spec is None:
            raise InvalidArgument.field("job.model", f"must be one of: {', '.join(sorted(self._catalog))}")
        return spec

    async def get(self, tenant: str, job_id: str) -> JobRecord:
        return await self._store.get(tenant, job_id)

    async def list_jobs(self, tenant: str, page_size: int, page_token: str) -> tuple[list[JobRecord], str]:
        return await self._store.list_jobs(tenant, page_size, page_token)

    async def cancel(self, tenant: str, job_id: str) -> JobRecord:
        record, running = await self._store.cancel(tenant, job_id)
        if running:
            await self._hub.publish_cancel(tenant, job_id)
        else:
            await self._queues.remove(queued(record))
        return record

    def watch(self, tenant: str, job_id: str, after_event_id: str) -> AsyncIterator[tuple[str, JobRecord]]:
        return self._store.events(tenant, job_id, after_event_id, self._watch_block_ms)

    async def artifact(self, tenant: str, job_id: str, index: int) -> tuple[str, int, AsyncIterator[bytes]]:
        """(mime type, size, chunks) of one artifact of a job that belongs to `tenant`."""
        record = await self._store.get(tenant, job_id)
        for artifact in record.artifacts:
            if artifact.index == index:
                chunks = self._store.artifact_chunks(tenant, job_id, index, ARTIFACT_CHUNK_BYTES)
                return artifact.mime_type, artifact.size_bytes, chunks
        name = artifact_name(job_id, index)
        raise NotFound(f"{name} not found", reason="ARTIFACT_NOT_FOUND", metadata={"name": name})
