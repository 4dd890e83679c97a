"""Models no worker can load: their waiting jobs fail with MODEL_LOAD_FAILED instead of waiting out
their queue timeout.

A worker that cannot load a model reports it and simply does not take that model's jobs, so other
workers run them. Only when live workers have tried the model and none has it ready do its jobs end,
and they go to the dead-letter list, so an operator who fixes the model can requeue them.
"""

from __future__ import annotations

from libs.errors import NotFound
from libs.jobs import JobError, State
from services.scheduler.queues import Queues, intent_member
from services.scheduler.registry import Registry
from services.scheduler.store import JobStore

INTENT = "load_failed"


class ModelHealth:
    def __init__(
        self, queues: Queues, store: JobStore, registry: Registry, models: list[str], *, grace_ms: int
    ) -> None:
        self._queues = queues
        self._store = store
        self._registry = registry
        self._models = models
        self._grace_ms = grace_ms
        self._why: dict[str, str] = {}

    async def check(self) -> int:
        live = await self._registry.live()
        ended = 0
        for model in self._models:
            failures = [w.failed_models[model] for w in live if model in w.failed_models]
            if not failures or any(model in w.models for w in live):
                continue
            if not await self._queues.waiting(model):
                continue
            self._why[model] = f"{len(failures)} worker(s) tried; {failures[0]}"
            for tenant, job_id in await self._queues.drop_model(model, INTENT, self._grace_ms):
                await self.end(tenant, job_id)
                await self._queues.done(intent_member(INTENT, tenant, job_id))
                ended += 1
        return ended

    async def end(self, tenant: str, job_id: str) -> None:
        try:
            record = await self._store.get(tenant, job_id)
        except NotFound:
            return
        why = self._why.get(record.model, "no live worker has it loaded")
        error = JobError(
            "UNAVAILABLE",
            f"no worker can load model {record.model}: {why}",
            "MODEL_LOAD_FAILED",
            {"model": record.model},
        )
        outcome = await self._store.end_queued(tenant, job_id, State.FAILED, error, dead_letter=True)
        if outcome.ok:
            await self._queues.bury(tenant, job_id, None)
