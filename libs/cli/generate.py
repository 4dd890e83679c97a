"""`kiln generate`: submit a job through the API, show its progress, save the images."""

from __future__ import annotations

import sys
from pathlib import Path

from kiln.v1 import job_pb2

from libs.sdk.client import KilnClient

BAR_WIDTH = 30


def _bar(step: int, total: int) -> str:
    filled = BAR_WIDTH * step // max(total, 1)
    return f"\r[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] step {step}/{total}"


def output_paths(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


async def generate(target: str, api_key: str, job: job_pb2.Job, out: Path) -> list[Path]:
    async with KilnClient(target, api_key) as client:
        created = await client.create_job(job)
        print(f"{created.name} queued", file=sys.stderr)
        final = created
        async for event in client.watch(created.name):
            final = event.job
            if final.state == job_pb2.Job.STATE_RUNNING and final.progress.total_steps:
                print(
                    _bar(final.progress.step, final.progress.total_steps), end="", file=sys.stderr, flush=True
                )
        print(file=sys.stderr)
        if final.state != job_pb2.Job.STATE_SUCCEEDED:
            state = job_pb2.Job.State.Name(final.state)
            raise SystemExit(f"{created.name} ended {state}: {final.error.message}")
        paths = output_paths(out, len(final.artifacts))
        for artifact, path in zip(final.artifacts, paths, strict=True):
            path.write_bytes(await client.download(artifact.name))
            print(f"saved {path} ({artifact.width}x{artifact.height}, seed {artifact.seed})", file=sys.stderr)
        return paths
