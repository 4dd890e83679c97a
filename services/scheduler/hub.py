"""This replica's view of its connected workers, fed by Redis pub/sub hints.

A wake-up says "a queue got work"; a cancel says "stop this job". Both are hints: a missed wake-up
is covered by the dispatchers' polling, and a cancel reaches whichever replica holds the job.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from libs import redis_keys as keys

log = logging.getLogger(__name__)


class Link(Protocol):
    def poke(self) -> None: ...

    def cancel(self, tenant: str, job_id: str) -> None: ...


class Hub:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._links: set[Link] = set()
        self._running: dict[tuple[str, str], Link] = {}
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="hub-listen")
        await asyncio.wait_for(self._subscribed.wait(), timeout=10)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def attach(self, link: Link) -> None:
        self._links.add(link)

    def detach(self, link: Link) -> None:
        self._links.discard(link)
        for job, holder in list(self._running.items()):
            if holder is link:
                del self._running[job]

    def running(self, tenant: str, job_id: str, link: Link) -> None:
        self._running[(tenant, job_id)] = link

    def finished(self, tenant: str, job_id: str, link: Link) -> None:
        """`link` is done with the job; a newer holder (its next attempt, here) keeps its entry."""
        if self._running.get((tenant, job_id)) is link:
            del self._running[(tenant, job_id)]

    async def publish_cancel(self, tenant: str, job_id: str) -> None:
        await self._redis.publish(keys.CANCEL_CHANNEL, keys.queue_entry(tenant, job_id))

    def _dispatch(self, channel: str, data: str) -> None:
        if channel == keys.WAKE_CHANNEL:
            for link in self._links:
                link.poke()
        elif channel == keys.CANCEL_CHANNEL:
            tenant, job_id = keys.parse_queue_entry(data)
            holder = self._running.get((tenant, job_id))
            if holder is not None:
                holder.cancel(tenant, job_id)

    async def _listen(self) -> None:
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(keys.WAKE_CHANNEL, keys.CANCEL_CHANNEL)
                self._subscribed.set()
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        self._dispatch(message["channel"].decode(), message["data"].decode())
            except (RedisError, OSError) as exc:
                log.warning("pub/sub connection lost (%s); resubscribing", exc)
                await asyncio.sleep(0.5)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
