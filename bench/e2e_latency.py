"""Submit-to-result latency through the whole suite, against the same pipeline call made directly.

Both sides run a 64x64, 4-step tiny-sd job and end with the PNG bytes in hand:
- direct: build tiny-sd in this process and call the worker's own generate function;
- gRPC: CreateJob, WatchJob until SUCCEEDED, ReadArtifact, through gateway, scheduler and worker
  running as separate processes on a private Redis (what `make run` starts);
- REST: POST /v1/jobs, the SSE watch, GET ...:read.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from kiln.v1 import job_pb2

from libs.cli.devstack import LocalStack
from libs.jobs import TextToImage
from libs.redis_server import free_port
from libs.sdk.client import KilnClient
from services.gpu_worker.generate import generate
from services.gpu_worker.tiny_sd import build_tiny_sd

SPEC = TextToImage("a red fox", "", 64, 64, 4, 7.5, 7, 1)


def direct(runs: int) -> list[float]:
    pipe = build_tiny_sd()
    pipe.set_progress_bar_config(disable=True)  # as the worker's loader does
    never = threading.Event()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        images = generate(pipe, SPEC, lambda step, total: None, never).images
        assert images[0].width == 64
        times.append(time.perf_counter() - start)
    return times


async def via_grpc(client: KilnClient) -> None:
    t2i = job_pb2.TextToImage(prompt=SPEC.prompt, width=64, height=64, steps=4, seed=SPEC.seed)
    job = await client.create_job(job_pb2.Job(model="tiny-sd", text_to_image=t2i))
    async for event in client.watch(job.name):
        job = event.job
    assert job.state == job_pb2.Job.STATE_SUCCEEDED, job
    assert len(await client.download(job.artifacts[0].name)) == job.artifacts[0].size_bytes


async def via_rest(http: aiohttp.ClientSession, base: str, key: str) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    body = {
        "model": "tiny-sd",
        "textToImage": {"prompt": SPEC.prompt, "width": 64, "height": 64, "steps": 4, "seed": str(SPEC.seed)},
    }
    async with http.post(f"{base}/v1/jobs", json=body, headers=headers) as resp:
        name = (await resp.json())["name"]
    async with http.get(f"{base}/v1/{name}:watch", headers=headers) as resp:
        last = b""
        async for line in resp.content:
            if line.startswith(b"data:"):
                last = line
    assert b"STATE_SUCCEEDED" in last
    async with http.get(f"{base}/v1/{name}/artifacts/0:read", headers=headers) as resp:
        assert len(await resp.read()) > 0


async def timed(call: Callable[[], Awaitable[None]], runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        await call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        await call()
        times.append(time.perf_counter() - start)
    return times


def row(label: str, times: list[float]) -> str:
    ms = sorted(t * 1000 for t in times)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return f"{label:<34}{statistics.median(ms):>10.1f}{p95:>10.1f}{statistics.fmean(ms):>10.1f}"


async def main(runs: int, warmup: int) -> None:
    base_times = direct(runs + warmup)[warmup:]
    with tempfile.TemporaryDirectory() as state:
        stack = LocalStack(free_port(), free_port(), free_port(), state_dir=Path(state))
        try:
            await stack.start()
            async with KilnClient(f"127.0.0.1:{stack.grpc_port}", stack.api_key) as client:
                grpc_times = await timed(lambda: via_grpc(client), runs, warmup)
            async with aiohttp.ClientSession() as http:
                base = f"http://127.0.0.1:{stack.http_port}"
                rest_times = await timed(lambda: via_rest(http, base, stack.api_key), runs, warmup)
        finally:
            await stack.stop()
    d, g, r = statistics.median(base_times), statistics.median(grpc_times), statistics.median(rest_times)
    print(f"\ntiny-sd 64x64, 4 steps; {runs} runs each after {warmup} warm-up runs (ms)")
    print(f"{'':<34}{'median':>10}{'p95':>10}{'mean':>10}")
    print(row("direct pipeline call (baseline)", base_times))
    print(row("suite via gRPC (submit->PNG)", grpc_times))
    print(row("suite via REST+SSE (submit->PNG)", rest_times))
    print(f"overhead of the suite, median: gRPC {1000 * (g - d):.1f} ms, REST {1000 * (r - d):.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.warmup))
