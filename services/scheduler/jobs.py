"""What the scheduler does for the gateway: admit, look up, cancel, watch and read jobs."""

from __future__ import annotations

from collections.abc import AsyncIterator

from libs.catalog import ModelSpec
from libs.cost import compute_units
from libs.errors import InvalidArgument, NotFound
from libs.jobs import JobRecord, TextToImage, artifact_name
from libs.tiers import Tier, tier_of
from services.scheduler.admission import terms
from services.scheduler.hub import Hub
from services.scheduler.queues import Queues, queued
from services.scheduler.store import JobStore

ARTIFACT_CHUNK_BYTES = 1 << 20


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
        fingerprint: str = "",
        traceparent: str = "",
        queue_timeout_ms: int = 0,
    ) -> JobRecord:
        model_spec = self._catalog.get(model)
        if model_spec is None:
            raise InvalidArgument.field("job.model", f"must be one of: {', '.join(sorted(self._catalog))}")
        cost = compute_units(spec, model_spec.cost_factor)
        tier_config = tier_of(self._tiers, tier)
        longest = int(tier_config.max_queue_wait_s * 1000)
        record, created = await self._store.create(
            tenant,
            model,
            spec,
            terms(tier, tier_config, cost),
            request_id=request_id,
            fingerprint=fingerprint,
            traceparent=traceparent,
            queue_timeout_ms=min(queue_timeout_ms, longest) if queue_timeout_ms > 0 else longest,
        )
        if created:
            await self._queues.enqueue(queued(record))
        return record

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
