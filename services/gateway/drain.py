"""The gateway's shutdown: once it begins, new REST calls are refused and open watch streams end.

Both answers are `UNAVAILABLE` with reason `SHUTTING_DOWN` and a retry delay: the client retries
on another replica (or this one restarted), and a watcher reattaches from its last event id.
Calls already running (a CreateJob, an artifact download) are left to finish within the grace.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import TypeVar, cast

from libs.errors import Unavailable

T = TypeVar("T")
RETRY_AFTER_S = 1.0
_END = object()


def shutting_down(what: str) -> Unavailable:
    return Unavailable(
        f"the gateway is shutting down; {what}", reason="SHUTTING_DOWN", retry_after_s=RETRY_AFTER_S
    )


class Drain:
    def __init__(self) -> None:
        self._begun = asyncio.Event()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def begun(self) -> bool:
        return self._begun.is_set()

    def begin(self) -> None:
        self._begun.set()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Counts a call in flight; refuses it once the drain has begun."""
        if self.begun:
            raise shutting_down("retry")
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def settled(self, timeout_s: float) -> bool:
        """Waits until no tracked call is left, at most `timeout_s`; whether none is."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        return self._idle.is_set()

    async def until_begun(self, stream: AsyncIterator[T]) -> AsyncIterator[T]:
        """The items of `stream` until the drain begins, then `UNAVAILABLE`: an endless stream
        (a watch) must not hold the shutdown up."""
        begun = asyncio.ensure_future(self._begun.wait())
        try:
            while True:
                item = asyncio.ensure_future(anext(stream, _END))
                await asyncio.wait([item, begun], return_when=asyncio.FIRST_COMPLETED)
                if not item.done():
                    item.cancel()
                    await asyncio.gather(item, return_exceptions=True)
                    raise shutting_down("reconnect and resume from the last event id")
                value = item.result()
                if value is _END:
                    return
                yield cast(T, value)
        finally:
            begun.cancel()
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
