"""Riding out a Redis outage on a worker's stream: a report is retried until Redis answers again,
rather than ending the stream, which would blame the worker (its jobs counted as crashed) for a
failure of the scheduler's own storage."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Only failures to reach Redis: a script error is a bug, and retrying it changes nothing.
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)


async def until_reachable(step: Callable[[], Awaitable[T]], *, within_s: float, what: str) -> T:
    """Runs `step`, again after each failure to reach Redis, for up to `within_s`; then raises.
    Each step is a fenced script or a read, so running one twice changes nothing."""
    deadline = time.monotonic() + within_s
    delay = 0.1
    while True:
        try:
            return await step()
        except UNREACHABLE as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s: Redis unreachable (%s); retrying", what, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
