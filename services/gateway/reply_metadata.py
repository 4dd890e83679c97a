"""Headers a `JobsApi` method adds to its reply, for whichever edge called it.

The edges open `collect()` around the call; the method calls `add()`; the REST edge sends what was
added as HTTP headers, the gRPC edge as initial metadata (names lower-cased). Outside `collect()`,
`add()` does nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_current: ContextVar[dict[str, str] | None] = ContextVar("kiln_reply_metadata", default=None)

IDEMPOTENT_REPLAYED = "Idempotent-Replayed"


def add(name: str, value: str) -> None:
    headers = _current.get()
    if headers is not None:
        headers[name] = value


@contextmanager
def collect() -> Iterator[dict[str, str]]:
    headers: dict[str, str] = {}
    token = _current.set(headers)
    try:
        yield headers
    finally:
        _current.reset(token)
