"""Failover with every part a real process: a private redis-server with AOF, a scheduler with short
timings, and tiny-sd workers (each with its pipeline child process).

- A worker killed with SIGKILL mid-denoise, while it also holds a prefetched job: both jobs run to
  the end on the other worker, within the lease plus 5 s of the kill.
- Redis stopped and started again (same port, same AOF) while 50 jobs are queued or running: the
  scheduler and the workers reconnect by themselves and every job succeeds.
- A run three times longer than its lease: the worker's heartbeats keep the lease, so it runs once.

Every job must end SUCCEEDED with exactly one result accepted, counted from the services' own logs:
a worker logs "sent result of jobs/<id> attempt <n>" per run it finished and sent, the scheduler
"accepted result of jobs/<id> attempt <n> from <worker>" per result it recorded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from kiln.scheduler.v1 import scheduler_service_pb2 as spb
from kiln.scheduler.v1 import scheduler_service_pb2_grpc as spb_grpc
from kiln.v1 import job_pb2

from libs.redis_server import RedisServer, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

Job = job_pb2.Job
Attempt = job_pb2.Attempt
TENANT = "failover"
SENT = re.compile(r"sent result of jobs/(\S+) attempt (\d+)")
ACCEPTED = re.compile(r"accepted result of jobs/(\S+) attempt (\d+) from (\S+)")
# Marks this module's service processes (and their children), to find any left running.
RUN_TAG = "FAILOVER_TEST_RUN"
LEASE_S = 3.0
LONG_STEPS = 60
TIMINGS = {
    "KILN_LEASE_SECONDS": str(LEASE_S),
    "KILN_HEARTBEAT_INTERVAL_MS": "500",
    "KILN_RETRY_BACKOFF_BASE_SECONDS": "0.2",
    "KILN_RECOVERY_GRACE_SECONDS": "1",
    "KILN_QUEUE_EXPIRY_INTERVAL_SECONDS": "0.1",
}
WORKER = {
    "KILN_WORKER_SLOTS": "1",
    "KILN_WORKER_PREFETCH": "1",
    "KILN_RECONNECT_SECONDS": "0.2",
    # Teardown stops workers with SIGTERM; a run still going is not worth waiting for.
    "KILN_WORKER_DRAIN_SECONDS": "1",
}


async def _launch(
    module: str, env: dict[str, str], log: Path, procs: list[asyncio.subprocess.Process]
) -> tuple[asyncio.subprocess.Process, dict[str, int]]:
    """Starts `python -m module` with stderr to `log`; returns once it prints KILN_READY."""
    with log.open("ab") as stderr:  # the child has its own copy of the descriptor
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, env=env, stdout=asyncio.subprocess.PIPE, stderr=stderr
        )
    procs.append(proc)  # before the wait, so that teardown stops it whatever happens
    assert proc.stdout is not None
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=150)).decode()
        assert line, f"{module} exited with {await proc.wait()}; see {log}"
        if line.startswith("KILN_READY"):
            return proc, {k: int(v) for k, v in (item.split("=") for item in line.split()[2:])}


class Gate:
    """A TCP relay to the scheduler that listens only once opened. A worker that dials it retries
    until then, so it can be started (and its models loaded) early, yet take no job before the
    test lets it."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self._target_port = target_port
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._relays: set[asyncio.Task[object]] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        self._writers.append(writer)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        self._writers.append(up_writer)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._relays, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


class Cluster:
    """Redis (AOF), one scheduler and workers, as processes; logs under `logs`, one file each."""

    def __init__(self, logs: Path, repo_root: Path, timings: dict[str, str]) -> None:
        self.logs = logs
        self.redis = RedisServer(logs / "redis", appendonly=True)
        self.tag = uuid.uuid4().hex
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")} | {
            "PYTHONPATH": str(repo_root),
            "KILN_REDIS_URL": self.redis.url,
            "KILN_SCHEDULER_PORT": "0",
            "KILN_LOG_LEVEL": "INFO",
            RUN_TAG: self.tag,
            **timings,
        }
        self.procs: list[asyncio.subprocess.Process] = []
        self.workers: dict[str, asyncio.subprocess.Process] = {}
        self.gates: list[Gate] = []
        self.killed: set[int] = set()
        self.target = ""
        self.scheduler_port = 0
        self._channel: grpc.aio.Channel | None = None
        self._stub: spb_grpc.SchedulerServiceStub | None = None

    async def start(self) -> None:
        await asyncio.to_thread(self.redis.start)
        _, ports = await _launch("services.scheduler", self.env, self.logs / "scheduler.log", self.procs)
        self.scheduler_port = ports["grpc"]
        self.target = f"127.0.0.1:{self.scheduler_port}"
        self._channel = grpc.aio.insecure_channel(self.target)
        self._stub = spb_grpc.SchedulerServiceStub(self._channel)

    async def start_workers(self, *worker_ids: str, address: str = "") -> None:
        env = self.env | WORKER | {"KILN_SCHEDULER_ADDRESS": address or self.target}
        started = await asyncio.gather(
            *(
                _launch(
                    "services.gpu_worker", env | {"KILN_WORKER_ID": w}, self.logs / f"{w}.log", self.procs
                )
                for w in worker_ids
            )
        )
        self.workers |= {w: proc for w, (proc, _) in zip(worker_ids, started, strict=True)}

    def gate(self) -> Gate:
        gate = Gate(self.scheduler_port)
        self.gates.append(gate)
        return gate

    async def wait_connected(self, worker_id: str, timeout_s: float = 30) -> None:
        """Until the scheduler logs the worker's registration."""
        deadline = time.monotonic() + timeout_s
        while f"worker {worker_id} connected" not in (self.logs / "scheduler.log").read_text():
            assert time.monotonic() < deadline, f"{worker_id} never registered"
            await asyncio.sleep(0.02)

    async def submit(self, prompt: str, *, steps: int, size: int = 64, num_images: int = 1) -> str:
        """A job straight to the scheduler, fully resolved as the gateway would send it."""
        assert self._stub is not None
        job = Job(
            model="tiny-sd",
            text_to_image=job_pb2.TextToImage(
                prompt=prompt,
                width=size,
                height=size,
                steps=steps,
                guidance_scale=7.5,
                seed=1,
                num_images=num_images,
            ),
        )
        reply = await self._stub.SubmitJob(spb.SubmitJobRequest(tenant=TENANT, tier="enterprise", job=job))
        return reply.job.name

    async def get(self, name: str, timeout_s: float = 60) -> Job:
        """GetJob, asked again while the scheduler cannot reach Redis (UNAVAILABLE)."""
        assert self._stub is not None
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                reply = await self._stub.GetJob(spb.GetJobRequest(tenant=TENANT, name=name), timeout=10)
            except grpc.aio.AioRpcError as exc:
                retry = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                if not retry or time.monotonic() > deadline:
                    raise
                self.check_alive()
                await asyncio.sleep(0.1)
            else:
                return reply.job

    def kill(self, worker_id: str) -> None:
        proc = self.workers[worker_id]
        self.killed.add(proc.pid)
        proc.send_signal(signal.SIGKILL)

    def check_alive(self) -> None:
        """Fails at once when a service exits that the test did not kill."""
        exited = [p.returncode for p in self.procs if p.returncode is not None and p.pid not in self.killed]
        assert not exited, f"a service exited on its own with {exited}; see the logs in {self.logs}"

    async def get_all(self, names: list[str]) -> dict[str, Job]:
        return dict(zip(names, await asyncio.gather(*(self.get(n) for n in names)), strict=True))

    async def wait_for(
        self, names: list[str], done: Callable[[dict[str, Job]], bool], timeout_s: float
    ) -> dict[str, Job]:
        deadline = time.monotonic() + timeout_s
        while True:
            jobs = await self.get_all(names)
            if done(jobs):
                return jobs
            self.check_alive()
            assert time.monotonic() < deadline, f"timed out; states now: {_states(jobs)}"
            await asyncio.sleep(0.05)

    async def read_artifact(self, name: str) -> bytes:
        assert self._stub is not None
        request = spb.ReadArtifactRequest(tenant=TENANT, name=name)
        return b"".join([chunk.data async for chunk in self._stub.ReadArtifact(request)])

    def sent(self) -> list[tuple[str, int, str]]:
        """(job id, attempt, worker) for each result a worker sent."""
        return [
            (m[1], int(m[2]), w)
            for w in sorted(self.workers)
            for m in SENT.finditer((self.logs / f"{w}.log").read_text())
        ]

    def accepted(self) -> list[tuple[str, int, str]]:
        """(job id, attempt, worker) for each result the scheduler accepted."""
        text = (self.logs / "scheduler.log").read_text()
        return [(m[1], int(m[2]), m[3]) for m in ACCEPTED.finditer(text)]

    async def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 30)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
        for gate in self.gates:
            await gate.close()
        if self._channel is not None:
            await self._channel.close()
        await asyncio.to_thread(self.redis.stop)
        # The workers' pipeline children and forkservers must go with them (the SIGKILLed one's too).
        for _ in range(100):
            if not (left := _tagged(self.tag)):
                break
            await asyncio.sleep(0.1)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not left, f"processes left running: {[_cmdline(pid) for pid in left]}"


def _tagged(tag: str) -> list[int]:
    """Live processes (not zombies) whose environment carries this run's tag."""
    marker = f"{RUN_TAG}={tag}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    return str(pid)


@contextlib.asynccontextmanager
async def cluster(logs: Path, repo_root: Path, timings: dict[str, str] = TIMINGS) -> AsyncIterator[Cluster]:
    running = Cluster(logs, repo_root, timings)
    try:
        await running.start()
        yield running
    finally:
        await running.close()


def _report(what: str, value: object) -> None:
    """A measurement, for `pytest -rP`."""
    print(f"{what}: {value}")


def _states(jobs: dict[str, Job]) -> dict[str, int]:
    return dict(collections.Counter(Job.State.Name(j.state) for j in jobs.values()))


def _attempts(job: Job) -> list[tuple[int, str, str]]:
    return [(a.attempt, a.worker, Attempt.Outcome.Name(a.outcome)) for a in job.attempts]


def _reason(status: status_pb2.Status) -> tuple[str, dict[str, str]]:
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return str(info.reason), dict(info.metadata)


def _succeeded(jobs: dict[str, Job]) -> bool:
    return all(j.state == Job.STATE_SUCCEEDED for j in jobs.values()) or any(
        j.state in (Job.STATE_FAILED, Job.STATE_CANCELLED) for j in jobs.values()
    )


async def test_sigkill_mid_denoise_moves_both_held_jobs_to_the_other_worker(
    tmp_path: Path, repo_root: Path
) -> None:
    async with cluster(tmp_path, repo_root) as c:
        gate = c.gate()
        # B loads its model alongside A, but dials a gate that is still shut: it can take nothing.
        await asyncio.gather(c.start_workers("worker-a"), c.start_workers("worker-b", address=gate.address))
        await c.wait_connected("worker-a")
        # Long enough to be killed mid-denoise, short enough that its rerun fits the bound below.
        long = await c.submit("long", steps=LONG_STEPS)
        short = await c.submit("short", steps=4)
        names = [long, short]

        def held_by_a(jobs: dict[str, Job]) -> bool:
            return all(
                j.state == Job.STATE_RUNNING and _attempts(j) == [(1, "worker-a", "OUTCOME_RUNNING")]
                for j in jobs.values()
            )

        # A holds both: the long one denoising in its slot, the short one prefetched.
        await c.wait_for(names, lambda jobs: held_by_a(jobs) and jobs[long].progress.step > 0, 30)
        await gate.open()
        await c.wait_connected("worker-b")
        before = await c.get_all(names)
        assert held_by_a(before), before
        assert 0 < before[long].progress.step < LONG_STEPS
        assert before[long].progress.total_steps == LONG_STEPS
        assert before[short].progress.step == 0

        killed_at = time.monotonic()
        c.kill("worker-a")
        final = await c.wait_for(names, _succeeded, 60)
        recovery_s = time.monotonic() - killed_at
        _report("recovery_s", round(recovery_s, 2))
        _report("step_at_kill", before[long].progress.step)

        assert await c.workers["worker-a"].wait() == -signal.SIGKILL
        assert [Job.State.Name(final[n].state) for n in names] == ["STATE_SUCCEEDED"] * 2
        # The run A was killed in counts as a crash; the prefetched job goes back for free.
        assert final[long].attempt == 2
        assert _attempts(final[long]) == [
            (1, "worker-a", "OUTCOME_FAILED"),
            (2, "worker-b", "OUTCOME_SUCCEEDED"),
        ]
        assert _reason(final[long].attempts[0].error) == (
            "WORKER_CRASHED",
            {"worker": "worker-a", "detected_by": "scheduler"},
        )
        assert final[short].attempt == 2
        assert _attempts(final[short]) == [
            (1, "worker-a", "OUTCOME_RELEASED"),
            (2, "worker-b", "OUTCOME_SUCCEEDED"),
        ]
        for name in names:
            assert len(final[name].artifacts) == 1
        ids = [n.removeprefix("jobs/") for n in names]
        assert sorted(c.accepted()) == sorted((i, 2, "worker-b") for i in ids)
        assert sorted(c.sent()) == sorted((i, 2, "worker-b") for i in ids)
        assert recovery_s < LEASE_S + 5, f"recovered {recovery_s:.1f} s after the kill"


async def test_redis_restart_with_aof_loses_no_job_and_accepts_one_result_each(
    tmp_path: Path, repo_root: Path
) -> None:
    async with cluster(tmp_path, repo_root) as c:
        await c.start_workers("worker-1", "worker-2")
        for worker in c.workers:
            await c.wait_connected(worker)
        names = list(await asyncio.gather(*(c.submit(f"restart {i}", steps=4) for i in range(50))))

        def under_way(jobs: dict[str, Job]) -> bool:
            states = collections.Counter(j.state for j in jobs.values())
            return states[Job.STATE_SUCCEEDED] > 0 and states[Job.STATE_QUEUED] >= 10

        at_stop = await c.wait_for(names, under_way, 60)
        await asyncio.to_thread(c.redis.stop)  # SIGTERM: Redis writes out the AOF and exits
        stopped_at = time.monotonic()
        await asyncio.sleep(2)
        await asyncio.to_thread(c.redis.start)  # the same port and directory
        final = await c.wait_for(names, _succeeded, 150)
        _report("states_at_stop", _states(at_stop))
        _report("all_succeeded_s_after_stop", round(time.monotonic() - stopped_at, 2))

        # No manual step: every process still runs, none was restarted.
        assert [proc.returncode for proc in c.procs] == [None] * 3
        assert _states(final) == {"STATE_SUCCEEDED": 50}
        for job in final.values():
            assert len(job.artifacts) == 1
            last = job.attempts[-1]
            assert (last.attempt, Attempt.Outcome.Name(last.outcome)) == (job.attempt, "OUTCOME_SUCCEEDED")
        # Exactly one result accepted per job: that of its last attempt, from the worker it names.
        assert sorted(c.accepted()) == sorted(
            (n.removeprefix("jobs/"), final[n].attempt, final[n].attempts[-1].worker) for n in names
        )
        # What succeeded before the stop came back from the AOF, images included.
        done_before = [n for n in names if at_stop[n].state == Job.STATE_SUCCEEDED]
        for name in done_before:
            assert final[name] == at_stop[name]
            artifact = final[name].artifacts[0]
            data = await c.read_artifact(artifact.name)
            assert (len(data), hashlib.sha256(data).hexdigest()) == (artifact.size_bytes, artifact.sha256)
        sent = collections.Counter(job_id for job_id, _, _ in c.sent())
        _report("jobs_run_more_than_once", sum(n > 1 for n in sent.values()))
        _report("attempts", dict(collections.Counter(j.attempt for j in final.values())))


async def test_a_run_three_leases_long_runs_once(tmp_path: Path, repo_root: Path) -> None:
    timings = TIMINGS | {"KILN_LEASE_SECONDS": "1", "KILN_HEARTBEAT_INTERVAL_MS": "200"}
    async with cluster(tmp_path, repo_root, timings) as c:
        await c.start_workers("worker-1", "worker-2")
        for worker in c.workers:  # the other one is idle: it would get the job if the lease lapsed
            await c.wait_connected(worker)
        name = await c.submit("slow", steps=150, size=160, num_images=4)
        job = (await c.wait_for([name], _succeeded, 150))[name]
        attempt = job.attempts[0]
        run_s = (attempt.end_time.ToMilliseconds() - attempt.start_time.ToMilliseconds()) / 1000
        _report("run_s", run_s)

        assert Job.State.Name(job.state) == "STATE_SUCCEEDED"
        assert job.attempt == 1
        assert _attempts(job) == [(1, attempt.worker, "OUTCOME_SUCCEEDED")]
        assert run_s > 3 * 1.0, f"the run took {run_s:.1f} s: not three leases long"
        job_id = name.removeprefix("jobs/")
        assert c.sent() == [(job_id, 1, attempt.worker)]
        assert c.accepted() == [(job_id, 1, attempt.worker)]
        assert len(job.artifacts) == 4
