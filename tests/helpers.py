"""Small helpers the service and end-to-end tests share."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from PIL import Image


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.size


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def rest_wait(
    http: aiohttp.ClientSession, base: str, key: str, name: str, timeout_s: float = 60
) -> dict[str, Any]:
    """Polls GET /v1/{name} until the job is terminal."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        async with http.get(f"{base}/v1/{name}", headers=auth(key)) as resp:
            assert resp.status == 200, await resp.text()
            job: dict[str, Any] = await resp.json()
        if job["state"] in ("STATE_SUCCEEDED", "STATE_FAILED", "STATE_CANCELLED"):
            return job
        assert loop.time() < deadline, f"{name} still {job['state']}"
        await asyncio.sleep(0.05)


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, str, dict[str, Any]]]:
    """Parses a text/event-stream body into (id, event, data) triples."""
    event_id, event, data = "", "message", ""
    async for raw in resp.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                yield event_id, event, json.loads(data)
            event_id, event, data = "", "message", ""
        elif line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()
