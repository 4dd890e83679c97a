"""The timer every scheduler replica runs: backoffs that ended, queue timeouts, expired leases,
unfinished intents and unloadable models. Each chore is safe to run on all replicas at once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

log = logging.getLogger(__name__)

Chore = Callable[[], Awaitable[int]]


class Housekeeping:
    def __init__(self, chores: dict[str, Chore], interval_s: float) -> None:
        self._chores = chores
        self._interval_s = interval_s

    async def run_once(self) -> int:
        """Runs every chore once; how many items they handled. One failing does not stop the rest."""
        handled = 0
        for name, chore in self._chores.items():
            try:
                handled += await chore()
            except (RedisError, OSError) as exc:
                log.warning("housekeeping: %s skipped a round: %s", name, exc)
            except Exception:
                log.exception("housekeeping: %s failed", name)
        return handled

    async def run_forever(self) -> None:
        while True:
            if not await self.run_once():
                await asyncio.sleep(self._interval_s)
            else:
                await asyncio.sleep(0)  # more may be due; let other work in between
