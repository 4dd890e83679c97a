"""Chaos run: jobs through a scheduler and three workers while workers are killed at random.

Every process is real (redis-server, scheduler, three gpu_workers running tiny-sd in their child
processes). The chaos run sends SIGKILL to a random worker every few seconds and starts a new one in
its place; the baseline run is the same load with no kills. Each run prints the jobs submitted,
succeeded, failed (by reason), lost (never reached a terminal state) and run twice (more than one
worker finished a run of it, counted from the workers' own logs), side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import re
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from kiln.scheduler.v1 import scheduler_service_pb2 as spb
from kiln.scheduler.v1 import scheduler_service_pb2_grpc as spb_grpc
from kiln.v1 import job_pb2

from libs.cli.devstack import start_service
from libs.convert import error_from_pb
from libs.redis_server import RedisServer

WORKERS = 3
TERMINAL = (job_pb2.Job.STATE_SUCCEEDED, job_pb2.Job.STATE_FAILED, job_pb2.Job.STATE_CANCELLED)
# The worker logs one line per run it finished and sent back (services/gpu_worker/link.py).
FINISHED = re.compile(r"sent result of jobs/(\S+) attempt (\d+)")


@dataclass
class Result:
    submitted: int = 0
    succeeded: int = 0
    failed: collections.Counter[str] = field(default_factory=collections.Counter)
    lost: int = 0
    run_twice: int = 0
    kills: int = 0
    seconds: float = 0.0
    max_attempt: int = 0


class Fleet:
    """Three workers as processes, each replaceable after a kill -9."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self._env = env
        self._logs = logs
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self._started = 0

    async def start(self, slot: str) -> None:
        self._started += 1
        log = (self._logs / f"worker-{slot}-{self._started}.log").open("wb")
        env = {**self._env, "KILN_WORKER_ID": f"chaos-{slot}-{self._started}"}
        self.procs[slot], _ = await start_service("services.gpu_worker", env, stderr=log)

    async def kill(self, slot: str) -> None:
        proc = self.procs[slot]
        proc.send_signal(signal.SIGKILL)
        await proc.wait()

    async def stop(self) -> None:
        for proc in self.procs.values():
            await _stop(proc)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout=60)
        except TimeoutError:
            print(f"process {proc.pid} ignored SIGTERM for 60 s; killing it")
            proc.kill()
            await proc.wait()


async def run(jobs: int, chaos: bool, kill_every_s: float) -> Result:
    with tempfile.TemporaryDirectory(prefix="kiln-chaos-") as tmp:
        workdir = Path(tmp)
        redis = RedisServer(workdir / "redis", appendonly=True)
        redis.start()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("KILN_")},
            "KILN_REDIS_URL": redis.url,
            "KILN_SCHEDULER_PORT": "0",
            "KILN_LEASE_SECONDS": "3",
            "KILN_HEARTBEAT_INTERVAL_MS": "500",
            "KILN_RETRY_BACKOFF_BASE_SECONDS": "0.2",
            "KILN_RETRY_BACKOFF_MAX_SECONDS": "2",
            "KILN_RECOVERY_GRACE_SECONDS": "2",
            "KILN_LOG_LEVEL": "INFO",
        }
        sched_log = (workdir / "scheduler.log").open("wb")
        scheduler, ports = await start_service("services.scheduler", env, stderr=sched_log)
        target = f"127.0.0.1:{ports['grpc']}"
        env["KILN_SCHEDULER_ADDRESS"] = target
        env["KILN_WORKER_PREFETCH"] = "1"
        # Three workers (and their pipeline processes) share this machine's cores: one torch thread
        # each, or idle OpenMP threads spinning for a core slow every job down many times over.
        env["OMP_NUM_THREADS"] = "1"
        fleet = Fleet(env, workdir)
        await asyncio.gather(*(fleet.start(str(i)) for i in range(WORKERS)))
        result = Result()
        try:
            async with grpc.aio.insecure_channel(target) as channel:
                stub = spb_grpc.SchedulerServiceStub(channel)
                start = time.monotonic()
                names = await _submit(stub, jobs)
                result.submitted = len(names)
                killer = asyncio.create_task(_killer(fleet, result, kill_every_s)) if chaos else None
                final = await _wait(stub, names, timeout_s=600)
                result.seconds = time.monotonic() - start
                if killer is not None:
                    killer.cancel()
                    await asyncio.gather(killer, return_exceptions=True)
            for job in final.values():
                result.max_attempt = max(result.max_attempt, job.attempt)
                if job.state == job_pb2.Job.STATE_SUCCEEDED:
                    result.succeeded += 1
                elif job.state in TERMINAL:
                    result.failed[_reason(job)] += 1
                else:
                    result.lost += 1
            result.lost += len(names) - len(final)
        finally:
            await fleet.stop()
            await _stop(scheduler)
            redis.stop()
        result.run_twice = _run_twice(workdir)
        return result


def _run_twice(workdir: Path) -> int:
    """Jobs that more than one worker run finished, from the workers' logs."""
    finished = collections.Counter(
        m.group(1) for log in workdir.glob("worker-*.log") for m in FINISHED.finditer(log.read_text())
    )
    return sum(1 for n in finished.values() if n > 1)


async def _submit(stub: spb_grpc.SchedulerServiceStub, jobs: int) -> list[str]:
    async def one(i: int) -> str:
        job = job_pb2.Job(
            model="tiny-sd",
            text_to_image=job_pb2.TextToImage(
                prompt=f"chaos {i}", width=64, height=64, steps=4, guidance_scale=7.5, seed=i, num_images=1
            ),
        )
        reply = await stub.SubmitJob(spb.SubmitJobRequest(tenant="chaos", tier="enterprise", job=job))
        return reply.job.name

    return list(await asyncio.gather(*(one(i) for i in range(jobs))))


async def _killer(fleet: Fleet, result: Result, every_s: float) -> None:
    """Every few seconds, kill -9 a random worker that is up, unless it is the last one up; its
    replacement starts in the background (loading a model takes a while), so the kills go on."""
    rng = random.Random(7)
    restarts: set[asyncio.Task[None]] = set()
    try:
        while True:
            await asyncio.sleep(rng.uniform(0.5 * every_s, 1.5 * every_s))
            up = sorted(slot for slot, proc in fleet.procs.items() if proc.returncode is None)
            if len(up) < 2:
                continue
            slot = rng.choice(up)
            await fleet.kill(slot)
            result.kills += 1
            restart = asyncio.create_task(fleet.start(slot))
            restarts.add(restart)
            restart.add_done_callback(restarts.discard)
    finally:
        # Let replacements come up before the fleet is stopped, so none is left behind.
        await asyncio.gather(*restarts, return_exceptions=True)


async def _wait(
    stub: spb_grpc.SchedulerServiceStub, names: list[str], timeout_s: float
) -> dict[str, job_pb2.Job]:
    final: dict[str, job_pb2.Job] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pending = [n for n in names if n not in final or final[n].state not in TERMINAL]
        if not pending:
            break
        # Polled in small batches and not too often, so the watching does not starve the scheduler.
        for i in range(0, len(pending), 50):
            replies = await asyncio.gather(
                *(stub.GetJob(spb.GetJobRequest(tenant="chaos", name=n)) for n in pending[i : i + 50])
            )
            for reply in replies:
                final[reply.job.name] = reply.job
        await asyncio.sleep(2)
    return final


def _reason(job: job_pb2.Job) -> str:
    return error_from_pb(job.error).reason


def _print(baseline: Result, chaos: Result) -> None:
    reasons = sorted(set(baseline.failed) | set(chaos.failed))
    rows = [
        ("jobs submitted", baseline.submitted, chaos.submitted),
        ("workers killed (kill -9)", baseline.kills, chaos.kills),
        ("succeeded", baseline.succeeded, chaos.succeeded),
        *((f"failed: {r}", baseline.failed[r], chaos.failed[r]) for r in reasons),
        ("lost", baseline.lost, chaos.lost),
        ("run twice", baseline.run_twice, chaos.run_twice),
        ("most attempts of one job", baseline.max_attempt, chaos.max_attempt),
        ("wall time (s)", f"{baseline.seconds:.1f}", f"{chaos.seconds:.1f}"),
        ("jobs/s", f"{baseline.submitted / baseline.seconds:.1f}", f"{chaos.submitted / chaos.seconds:.1f}"),
    ]
    print(f"{'':28}{'baseline (no kills)':>22}{'chaos':>12}")
    for label, base, hit in rows:
        print(f"{label:28}{base!s:>22}{hit!s:>12}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--kill-every", type=float, default=4.0, help="mean seconds between kills")
    args = parser.parse_args()
    baseline = asyncio.run(run(args.jobs, False, args.kill_every))
    chaos = asyncio.run(run(args.jobs, True, args.kill_every))
    _print(baseline, chaos)
    if chaos.lost or chaos.run_twice or baseline.lost or baseline.run_twice:
        raise SystemExit("FAIL: jobs lost or run twice")


if __name__ == "__main__":
    main()
