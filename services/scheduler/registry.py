"""Which workers are alive and what they can run, as they last reported it (register, heartbeats).

Shared by every scheduler replica through Redis, so a decision that needs the whole fleet (is there
a bigger GPU? can anyone load this model?) sees workers connected to other replicas too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from redis.asyncio import Redis

from libs import redis_keys as keys


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    models: tuple[str, ...] = ()
    failed_models: dict[str, str] = field(default_factory=dict)
    vram_total_bytes: int = 0
    vram_free_bytes: int = 0
    seen_ms: int = 0


class Registry:
    def __init__(self, redis: Redis, *, stale_ms: int) -> None:
        self._redis = redis
        self._stale_ms = stale_ms

    async def report(self, info: WorkerInfo) -> None:
        seconds, micros = await self._redis.time()
        seen = int(seconds) * 1000 + int(micros) // 1000
        value = {**asdict(info), "models": list(info.models), "seen_ms": seen}
        await self._redis.hset(keys.workers(), info.worker_id, json.dumps(value, separators=(",", ":")))

    async def forget(self, worker_id: str) -> None:
        await self._redis.hdel(keys.workers(), worker_id)

    async def live(self) -> list[WorkerInfo]:
        """Workers heard from within the staleness limit; long-silent ones are dropped."""
        seconds, micros = await self._redis.time()
        now = int(seconds) * 1000 + int(micros) // 1000
        raw: dict[bytes, bytes] = await self._redis.hgetall(keys.workers())  # type: ignore[assignment]
        live = []
        for worker_id, value in raw.items():
            data = json.loads(value)
            info = WorkerInfo(
                worker_id=data["worker_id"],
                models=tuple(data["models"]),
                failed_models=dict(data["failed_models"]),
                vram_total_bytes=int(data["vram_total_bytes"]),
                vram_free_bytes=int(data["vram_free_bytes"]),
                seen_ms=int(data["seen_ms"]),
            )
            if now - info.seen_ms <= self._stale_ms:
                live.append(info)
            elif now - info.seen_ms > 10 * self._stale_ms:
                await self._redis.hdel(keys.workers(), worker_id)
        return live

    async def most_free_vram(self, model: str) -> int:
        return max((w.vram_free_bytes for w in await self.live() if model in w.models), default=0)
