"""GPU faults injected into the real denoising loop of real child processes end as typed failures,
and the runner keeps serving after each."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import ValidationError

from libs.catalog import TINY_SD
from libs.jobs import JobError, TextToImage
from libs.settings import WorkerSettings
from services.gpu_worker.faults import FaultRule, first_match
from services.gpu_worker.generate import generate
from services.gpu_worker.link import job_error
from services.gpu_worker.loader import load_pipeline
from services.gpu_worker.process_runner import ProcessRunner
from services.gpu_worker.runner import (
    PLAIN,
    AppliedOptions,
    Cancelled,
    ExecutionTimeout,
    Generated,
    Image,
    InvalidOutput,
    ModelLoadError,
    OutOfMemory,
    PipelineError,
    RunOptions,
    WorkerCrashed,
)
from services.gpu_worker.tiny_sd import build_tiny_sd
from services.gpu_worker.vram import FixedVramProbe, needed_bytes

GiB = 1 << 30
MODEL = "tiny-sd"
_BASE = TextToImage("a red fox in the snow", "", 64, 64, 4, 7.5, 42, 1)
RULES = [
    FaultRule(kind="oom", prompt_contains="[oom]", at_step=2, vram_needed_bytes=12 * GiB),
    FaultRule(kind="oom", prompt_contains="[oom-unless-savers]", unless_memory_savers=True),
    FaultRule(kind="crash", prompt_contains="[crash]"),
    FaultRule(kind="crash", prompt_contains="[crash-on-1]", attempts=[1]),
    FaultRule(kind="hang", prompt_contains="[hang]", at_step=2),
    FaultRule(kind="hang", prompt_contains="[hang-at-1]", at_step=1),
    FaultRule(kind="nan", prompt_contains="[nan]", at_step=2, unless_full_precision=True),
    FaultRule(kind="black", prompt_contains="[black]"),
]
PLAIN_APPLIED = AppliedOptions(attention_slicing=False, vae_tiling=False, dtype="float32")


def _prompt(tag: str) -> TextToImage:
    return dataclasses.replace(_BASE, prompt=f"{tag} {_BASE.prompt}")


def _ignore(step: int, total: int) -> None:
    pass


def _expected() -> list[Image]:
    return generate(load_pipeline(TINY_SD, "cpu"), _BASE, _ignore, threading.Event()).images


@pytest.fixture(scope="module")
async def runner(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ProcessRunner]:
    broken = tmp_path_factory.mktemp("models") / "broken"
    build_tiny_sd().save_pretrained(broken, safe_serialization=True)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a download cut short
    catalog = {MODEL: TINY_SD, "broken": TINY_SD.model_copy(update={"source": str(broken)})}
    runner = ProcessRunner(
        catalog,
        "cpu",
        1,
        [MODEL, "broken"],
        probe=FixedVramProbe(24 * GiB, 3 * GiB),
        faults=RULES,
        cancel_grace_s=1.0,
    )
    await runner.start()
    yield runner
    await runner.close()


async def _pid(runner: ProcessRunner) -> int:
    """The one child's pid, once a replacement has started after a crash."""
    for _ in range(1000):
        if runner.child_pids():
            break
        await asyncio.sleep(0.01)
    [pid] = runner.child_pids()
    return pid


async def _run(
    runner: ProcessRunner, spec: TextToImage, options: RunOptions = PLAIN, **kwargs: Any
) -> Generated:
    return await runner.run(MODEL, spec, _ignore, asyncio.Event(), options, **kwargs)


@pytest.mark.timeout(60)
async def test_injected_oom_reports_the_probe_figures_and_the_same_child_goes_on(
    runner: ProcessRunner,
) -> None:
    pids = runner.child_pids()
    steps: list[int] = []
    with pytest.raises(OutOfMemory) as raised:
        await runner.run(MODEL, _prompt("[oom]"), lambda i, n: steps.append(i), asyncio.Event())
    oom = raised.value
    assert (oom.vram_total_bytes, oom.vram_free_bytes, oom.vram_needed_bytes) == (24 * GiB, 3 * GiB, 12 * GiB)
    assert (oom.memory_savers, steps) == (False, [1])
    assert (await _run(runner, _BASE)).images == _expected()
    assert runner.child_pids() == pids


@pytest.mark.timeout(60)
async def test_memory_savers_are_on_for_that_run_only(runner: ProcessRunner) -> None:
    with pytest.raises(OutOfMemory) as raised:
        await _run(runner, _prompt("[oom-unless-savers]"))
    assert raised.value.vram_needed_bytes == 2 * GiB  # parsed from the injected torch message
    saved = await _run(runner, _prompt("[oom-unless-savers]"), RunOptions(memory_savers=True))
    assert saved.applied == AppliedOptions(attention_slicing=True, vae_tiling=True, dtype="float32")
    plain = await _run(runner, _BASE)
    assert (plain.applied, plain.images) == (PLAIN_APPLIED, _expected())


@pytest.mark.timeout(60)
async def test_kill_9_of_the_child_mid_run_is_a_crash_and_a_new_child_serves(
    runner: ProcessRunner,
) -> None:
    [pid] = runner.child_pids()
    at_step_1 = asyncio.Event()
    run = asyncio.create_task(
        runner.run(MODEL, _prompt("[hang]"), lambda i, n: at_step_1.set(), asyncio.Event())
    )
    await at_step_1.wait()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerCrashed) as raised:
        await run
    assert (raised.value.signal, raised.value.exit_code) == (9, -9)
    assert str(raised.value) == "the process running the pipeline was killed by SIGKILL"
    assert (await _run(runner, _BASE)).images == _expected()
    [new_pid] = runner.child_pids()
    assert new_pid != pid


@pytest.mark.timeout(60)
async def test_a_crash_on_every_attempt_fails_each_and_the_runner_works_on(
    runner: ProcessRunner,
) -> None:
    pids = []
    for attempt in (1, 2, 3):
        pids.append(await _pid(runner))
        with pytest.raises(WorkerCrashed) as raised:
            await _run(runner, _prompt("[crash]"), attempt=attempt)
        assert raised.value.signal == 9
    assert (await _run(runner, _BASE)).images == _expected()
    pids.append(await _pid(runner))
    assert len(set(pids)) == 4  # a fresh child after each crash


@pytest.mark.timeout(60)
async def test_a_fault_limited_to_attempt_1_spares_attempt_2(runner: ProcessRunner) -> None:
    with pytest.raises(WorkerCrashed):
        await _run(runner, _prompt("[crash-on-1]"), attempt=1)
    assert len((await _run(runner, _prompt("[crash-on-1]"), attempt=2)).images) == 1


@pytest.mark.timeout(60)
async def test_a_hang_past_the_execution_timeout_is_stopped_and_the_next_runs(
    runner: ProcessRunner,
) -> None:
    [pid] = runner.child_pids()
    start = time.monotonic()
    with pytest.raises(ExecutionTimeout) as raised:
        await _run(runner, _prompt("[hang-at-1]"), execution_timeout_s=1.0)
    elapsed = time.monotonic() - start
    # 1 s of running, then 1 s of grace for a cancel the hung step never sees, then the kill.
    assert 2.0 <= elapsed < 5.0
    assert (raised.value.timeout_s, raised.value.step) == (1.0, 0)
    assert str(raised.value) == "the pipeline ran longer than its execution timeout of 1 s and was stopped"
    assert (await _run(runner, _BASE)).images == _expected()
    assert runner.child_pids() != [pid]


@pytest.mark.timeout(60)
async def test_cancel_of_a_hung_run_kills_the_child_after_the_grace(runner: ProcessRunner) -> None:
    cancel = asyncio.Event()
    with pytest.raises(Cancelled) as raised:
        await runner.run(MODEL, _prompt("[hang]"), lambda i, n: cancel.set(), cancel)
    assert raised.value.step == 1
    assert (await _run(runner, _BASE)).images == _expected()


@pytest.mark.timeout(60)
async def test_nan_latents_are_invalid_output_unless_full_precision(runner: ProcessRunner) -> None:
    steps: list[int] = []
    with pytest.raises(InvalidOutput) as raised:
        await runner.run(MODEL, _prompt("[nan]"), lambda i, n: steps.append(i), asyncio.Event())
    assert (raised.value.check, raised.value.full_precision, steps) == ("nan_latents", False, [1])
    full = await _run(runner, _prompt("[nan]"), RunOptions(full_precision=True))
    assert full.applied == PLAIN_APPLIED  # a CPU pipeline is float32 already
    assert len(full.images) == 1


@pytest.mark.timeout(60)
async def test_an_all_black_image_is_invalid_output(runner: ProcessRunner) -> None:
    with pytest.raises(InvalidOutput) as raised:
        await _run(runner, _prompt("[black]"))
    assert (raised.value.check, raised.value.full_precision) == ("black_image", False)
    assert str(raised.value) == "the pipeline produced an all-black image"


@pytest.mark.timeout(60)
async def test_a_corrupt_model_fails_to_load_while_the_other_serves(runner: ProcessRunner) -> None:
    states = runner.models()
    assert states.ready == [MODEL]
    assert list(states.failed) == ["broken"]
    with pytest.raises(ModelLoadError) as raised:
        await runner.run("broken", _BASE, _ignore, asyncio.Event())
    assert raised.value.model == "broken"
    assert str(raised.value).startswith("model 'broken': cannot load ")
    assert str(raised.value) == states.failed["broken"]
    assert (await _run(runner, _BASE)).images == _expected()


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            OutOfMemory("m", 24 * GiB, 3 * GiB, 12 * GiB, True),
            JobError(
                "RESOURCE_EXHAUSTED",
                "the GPU ran out of memory running this job",
                "OUT_OF_MEMORY",
                {
                    "vram_total_bytes": "25769803776",
                    "vram_free_bytes": "3221225472",
                    "vram_needed_bytes": "12884901888",
                    "memory_savers": "true",
                },
            ),
        ),
        (
            WorkerCrashed(-11),
            JobError(
                "UNAVAILABLE",
                "the process running the pipeline was killed by SIGSEGV",
                "WORKER_CRASHED",
                {"signal": "11"},
            ),
        ),
        (
            WorkerCrashed(3),
            JobError(
                "UNAVAILABLE",
                "the process running the pipeline exited with code 3",
                "WORKER_CRASHED",
                {"exit_code": "3"},
            ),
        ),
        (
            ModelLoadError("sdxl", "model 'sdxl': cannot load /m"),
            JobError("UNAVAILABLE", "model 'sdxl': cannot load /m", "MODEL_LOAD_FAILED", {"model": "sdxl"}),
        ),
        (
            ExecutionTimeout(2.5, 7),
            JobError(
                "DEADLINE_EXCEEDED",
                "the pipeline ran longer than its execution timeout of 2.5 s and was stopped",
                "DEADLINE_EXCEEDED",
                {"execution_timeout_ms": "2500", "step": "7"},
            ),
        ),
        (
            InvalidOutput("nan_latents", True),
            JobError(
                "INTERNAL",
                "the pipeline produced NaN latents",
                "INVALID_OUTPUT",
                {"check": "nan_latents", "full_precision": "true"},
            ),
        ),
        (
            PipelineError("ValueError: secret internals"),
            JobError("INTERNAL", "the pipeline failed", "PIPELINE_ERROR"),
        ),
        (RuntimeError("anything else"), JobError("INTERNAL", "the pipeline failed", "PIPELINE_ERROR")),
    ],
)
def test_each_failure_maps_to_one_job_error(error: Exception, expected: JobError) -> None:
    assert job_error(error) == expected


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.65 GiB total capacity)", 2 * GiB),
        ("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity", 20 << 20),
        ("CUDA out of memory. Tried to allocate 512 B", 512),
        ("CUDA error: out of memory", 0),
    ],
)
def test_needed_bytes_come_from_the_torch_message(message: str, expected: int) -> None:
    assert needed_bytes(message) == expected


def test_rules_match_on_prompt_model_attempt_and_spare_fallback_routes() -> None:
    rules = [
        FaultRule(kind="nan", model="sdxl", unless_full_precision=True),
        FaultRule(kind="oom", prompt_contains="big", attempts=[1, 2], unless_memory_savers=True),
    ]

    def pick(prompt: str, model: str, attempt: int, savers: bool = False, full: bool = False) -> str | None:
        rule = first_match(
            rules, prompt=prompt, model=model, attempt=attempt, memory_savers=savers, full_precision=full
        )
        return None if rule is None else rule.kind

    assert pick("cat", "sdxl", 1) == "nan"
    assert pick("cat", "sdxl", 1, full=True) is None
    assert pick("a big cat", "tiny-sd", 2) == "oom"
    assert pick("a big cat", "tiny-sd", 3) is None
    assert pick("a big cat", "tiny-sd", 1, savers=True) is None
    assert pick("cat", "tiny-sd", 1) is None


def test_faults_are_off_by_default_and_read_from_kiln_faults(monkeypatch: pytest.MonkeyPatch) -> None:
    assert WorkerSettings().faults == []
    monkeypatch.setenv("KILN_FAULTS", '[{"kind": "oom", "at_step": 2, "vram_needed_bytes": 1024}]')
    assert WorkerSettings().faults == [FaultRule(kind="oom", at_step=2, vram_needed_bytes=1024)]
    monkeypatch.setenv("KILN_FAULTS", '[{"kind": "oom", "probability": 0.5}]')
    with pytest.raises(ValidationError, match="probability"):
        WorkerSettings()
    monkeypatch.setenv("KILN_FAULTS", '[{"kind": "meteor"}]')
    with pytest.raises(ValidationError, match="kind"):
        WorkerSettings()


def test_worker_settings_defaults() -> None:
    settings = WorkerSettings()
    assert (settings.worker_prefetch, settings.worker_drain_seconds) == (1, 30.0)
    assert (settings.fake_vram_total_bytes, settings.fake_vram_free_bytes) == (0, 0)
