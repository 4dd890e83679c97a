"""Every GPU failure ends well, with its own reason: faults injected into a real worker (real
pipeline in real child processes) through its fault-injection seam, handled by a real scheduler.

The worker here serves models only it has, so the suite's own worker (same Redis) never takes these
jobs. Its VRAM readings come from the fake probe at the hardware edge: 24 GiB, 8 GiB free.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from kiln.v1 import job_pb2

from libs.catalog import BUILTIN_TINY_SD, ModelSpec
from libs.convert import error_from_pb
from libs.settings import SchedulerSettings, WorkerSettings
from services.gpu_worker.app import WorkerApp
from services.gpu_worker.faults import FaultRule
from services.gpu_worker.process_runner import ProcessRunner
from services.gpu_worker.tiny_sd import build_tiny_sd
from services.scheduler.app import SchedulerApp
from tests.conftest import Stack
from tests.service.test_delivery import ended, get_job, wait_job
from tests.service.wire_worker import submit

pytestmark = pytest.mark.timeout(120)

GiB = 1 << 30
Job = job_pb2.Job
Attempt = job_pb2.Attempt

FAULTS = [
    FaultRule(
        kind="oom", prompt_contains="[oom-once]", unless_memory_savers=True, vram_needed_bytes=12 * GiB
    ),
    FaultRule(kind="oom", prompt_contains="[oom-always]", at_step=2, vram_needed_bytes=30 * GiB),
    FaultRule(kind="crash", prompt_contains="[crash-always]", at_step=2),
    FaultRule(kind="hang", prompt_contains="[hang]", at_step=2),
    FaultRule(kind="nan", prompt_contains="[nan-once]", unless_full_precision=True),
    FaultRule(kind="black", prompt_contains="[black-always]"),
]


@pytest.fixture(scope="module")
def corrupt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers directory whose VAE weights file is garbage."""
    path = tmp_path_factory.mktemp("corrupt") / "corrupt-sd"
    build_tiny_sd().save_pretrained(path, safe_serialization=True)
    (path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\xff" * 64)
    return path


@pytest.fixture(scope="module")
async def faulty(stack: Stack, corrupt_dir: Path) -> AsyncIterator[tuple[SchedulerApp, WorkerApp]]:
    models = {
        **stack.scheduler.settings.models,
        "faulty-sd": ModelSpec(source=BUILTIN_TINY_SD, size_multiple=16, default_size=64, default_steps=4),
        "corrupt-sd": ModelSpec(source=str(corrupt_dir), size_multiple=16, default_size=64, default_steps=4),
    }
    scheduler = SchedulerApp(
        SchedulerSettings(
            redis_url=stack.redis_url,
            scheduler_port=0,
            models=models,
            lease_seconds=5,
            heartbeat_interval_ms=200,
            housekeeping_interval_seconds=0.05,
            retry_backoff_base_seconds=0.05,
            retry_backoff_max_seconds=0.2,
            execution_timeout_seconds=8,
            shutdown_grace_seconds=0.5,
        )
    )
    await scheduler.start()
    worker = WorkerApp(
        WorkerSettings(
            redis_url=stack.redis_url,
            scheduler_address=f"127.0.0.1:{scheduler.port}",
            worker_id="faulty-worker",
            worker_models=["faulty-sd", "corrupt-sd"],
            models=models,
            worker_slots=1,
            worker_prefetch=0,
            fake_vram_total_bytes=24 * GiB,
            fake_vram_free_bytes=8 * GiB,
            faults=FAULTS,
            worker_drain_seconds=1,
        )
    )
    await worker.start()
    assert worker.link is not None
    await asyncio.wait_for(worker.link.connected.wait(), timeout=60)
    yield scheduler, worker
    await worker.stop()
    await scheduler.stop()


async def run(faulty: tuple[SchedulerApp, WorkerApp], model: str, prompt: str, within: float = 30) -> Job:
    scheduler, _ = faulty
    target = f"127.0.0.1:{scheduler.port}"
    job = await submit(target, "tenant-faults", model, prompt)
    done = await wait_job(scheduler, "tenant-faults", job.name, ended, within)
    assert ended(done), f"{job.name} still {Job.State.Name(done.state)}"
    return done


def routes(job: Job) -> list[tuple[str, str, str]]:
    return [
        (
            Attempt.Route.Name(a.route),
            Attempt.Outcome.Name(a.outcome),
            error_from_pb(a.error).reason if a.HasField("error") else "",
        )
        for a in job.attempts
    ]


async def test_out_of_memory_once_succeeds_with_memory_savers_and_the_worker_goes_on(
    faulty: tuple[SchedulerApp, WorkerApp],
) -> None:
    done = await run(faulty, "faulty-sd", "[oom-once] a red fox")
    assert (done.state, done.attempt) == (Job.STATE_SUCCEEDED, 2)
    assert routes(done) == [
        ("ROUTE_STANDARD", "OUTCOME_FAILED", "OUT_OF_MEMORY"),
        ("ROUTE_MEMORY_SAVERS", "OUTCOME_SUCCEEDED", ""),
    ]
    assert error_from_pb(done.attempts[0].error).metadata == {
        "vram_total_bytes": str(24 * GiB),
        "vram_free_bytes": str(8 * GiB),
        "vram_needed_bytes": str(12 * GiB),
        "memory_savers": "false",
    }
    after = await run(faulty, "faulty-sd", "a red fox")
    assert (after.state, after.attempt) == (Job.STATE_SUCCEEDED, 1)


async def test_out_of_memory_on_every_attempt_fails_with_the_vram_figures(
    faulty: tuple[SchedulerApp, WorkerApp],
) -> None:
    done = await run(faulty, "faulty-sd", "[oom-always] a whale")
    assert (done.state, done.attempt) == (Job.STATE_FAILED, 2)
    error = error_from_pb(done.error)
    assert (error.code, error.reason) == ("RESOURCE_EXHAUSTED", "OUT_OF_MEMORY")
    assert error.metadata == {
        "vram_total_bytes": str(24 * GiB),
        "vram_free_bytes": str(8 * GiB),
        "vram_needed_bytes": str(30 * GiB),
        "memory_savers": "true",
    }
    assert routes(done) == [
        ("ROUTE_STANDARD", "OUTCOME_FAILED", "OUT_OF_MEMORY"),
        ("ROUTE_MEMORY_SAVERS", "OUTCOME_FAILED", "OUT_OF_MEMORY"),
    ]


async def test_a_child_killed_on_every_attempt_fails_worker_crashed_and_other_jobs_flow(
    faulty: tuple[SchedulerApp, WorkerApp],
) -> None:
    _, worker = faulty
    assert isinstance(worker.runner, ProcessRunner)
    pids_before = set(worker.runner.child_pids())
    poison, healthy = await asyncio.gather(
        run(faulty, "faulty-sd", "[crash-always] a poison job"), run(faulty, "faulty-sd", "a healthy job")
    )
    assert (poison.state, poison.attempt) == (Job.STATE_FAILED, 3)
    assert error_from_pb(poison.error).reason == "WORKER_CRASHED"
    assert error_from_pb(poison.error).metadata == {"signal": str(int(signal.SIGKILL))}
    assert [r for _, _, r in routes(poison)] == ["WORKER_CRASHED"] * 3
    assert healthy.state == Job.STATE_SUCCEEDED
    assert not pids_before & set(worker.runner.child_pids())  # replaced, and serving
    assert (await run(faulty, "faulty-sd", "after the poison")).state == Job.STATE_SUCCEEDED


async def test_a_real_kill_9_of_the_child_mid_run_is_retried_elsewhere(
    faulty: tuple[SchedulerApp, WorkerApp],
) -> None:
    scheduler, worker = faulty
    assert isinstance(worker.runner, ProcessRunner)
    target = f"127.0.0.1:{scheduler.port}"
    job = await submit(target, "tenant-faults", "faulty-sd", "killed from outside", steps=60)
    deadline = time.monotonic() + 30
    while (await get_job(scheduler, "tenant-faults", job.name)).progress.step < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    for pid in worker.runner.child_pids():
        os.kill(pid, signal.SIGKILL)
    done = await wait_job(scheduler, "tenant-faults", job.name, ended, 60)
    assert (done.state, done.attempt) == (Job.STATE_SUCCEEDED, 2)
    assert routes(done)[0] == ("ROUTE_STANDARD", "OUTCOME_FAILED", "WORKER_CRASHED")


async def test_a_corrupt_model_fails_model_load_failed_and_the_worker_still_serves_tiny_sd(
    faulty: tuple[SchedulerApp, WorkerApp],
) -> None:
    broken = await run(faulty, "corrupt-sd", "never loads")
    assert (broken.state, broken.attempt) == (Job.STATE_FAILED, 0)
    error = error_from_pb(broken.error)
    assert (error.code, error.reason, error.metadata) == (
        "UNAVAILABLE",
        "MODEL_LOAD_FAILED",
        {"model": "corrupt-sd"},
    )
    assert "corrupt-sd" in error.message and "1 worker(s) tried" in error.message
    assert (await run(faulty, "faulty-sd", "still here")).state == Job.STATE_SUCCEEDED


async def test_a_hung_pipeline_is_stopped_at_its_execution_timeout(
    faulty: tuple[SchedulerApp, WorkerApp],
) -> None:
    start = time.monotonic()
    done = await run(faulty, "faulty-sd", "[hang] stuck")
    took = time.monotonic() - start
    assert (done.state, done.attempt) == (Job.STATE_FAILED, 1)
    error = error_from_pb(done.error)
    assert (error.code, error.reason) == ("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED")
    assert error.metadata["execution_timeout_ms"] == "8000"
    assert "execution timeout of 8 s" in error.message
    assert 8 <= took < 40
    assert (await run(faulty, "faulty-sd", "after the hang")).state == Job.STATE_SUCCEEDED


async def test_nan_latents_are_retried_once_in_full_precision(faulty: tuple[SchedulerApp, WorkerApp]) -> None:
    done = await run(faulty, "faulty-sd", "[nan-once] a lake")
    assert (done.state, done.attempt) == (Job.STATE_SUCCEEDED, 2)
    assert routes(done) == [
        ("ROUTE_STANDARD", "OUTCOME_FAILED", "INVALID_OUTPUT"),
        ("ROUTE_FULL_PRECISION", "OUTCOME_SUCCEEDED", ""),
    ]
    assert error_from_pb(done.attempts[0].error).metadata == {
        "check": "nan_latents",
        "full_precision": "false",
    }


async def test_an_all_black_image_is_never_a_success(faulty: tuple[SchedulerApp, WorkerApp]) -> None:
    done = await run(faulty, "faulty-sd", "[black-always] a night")
    assert (done.state, done.attempt) == (Job.STATE_FAILED, 2)
    error = error_from_pb(done.error)
    assert (error.reason, error.metadata) == (
        "INVALID_OUTPUT",
        {"check": "black_image", "full_precision": "true"},
    )
    assert list(done.artifacts) == []
