"""The seam between the worker's job loop and the code that runs a diffusers pipeline.

The job loop only sees `PipelineRunner`; `ProcessRunner` (in `process_runner.py`) runs each pipeline
in a child process, so a CUDA fault that kills or poisons that process costs one job, not the worker.

A run ends in images or in one of these, which the link turns into a job error in one place:

    RunError
    ├── Cancelled          the job was cancelled (not an error to the client)
    ├── ModelLoadError     UNAVAILABLE         MODEL_LOAD_FAILED
    ├── OutOfMemory        RESOURCE_EXHAUSTED  OUT_OF_MEMORY
    ├── WorkerCrashed      UNAVAILABLE         WORKER_CRASHED
    ├── ExecutionTimeout   DEADLINE_EXCEEDED   DEADLINE_EXCEEDED
    ├── InvalidOutput      INTERNAL            INVALID_OUTPUT
    └── PipelineError      INTERNAL            PIPELINE_ERROR

They cross the process boundary by pickle, which rebuilds an exception from its `args`: so each one
passes every constructor argument, in order, to `Exception.__init__`.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from libs.jobs import TextToImage

# Called on the event loop after each denoising step with (step, total_steps).
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class Image:
    png: bytes
    sha256: str
    seed: int
    width: int
    height: int


@dataclass(frozen=True)
class RunOptions:
    """Fallback routes the scheduler asks for after a GPU failure."""

    memory_savers: bool = False
    full_precision: bool = False


PLAIN = RunOptions()


@dataclass(frozen=True)
class AppliedOptions:
    """What the pipeline actually ran with, read inside the denoising loop."""

    attention_slicing: bool
    vae_tiling: bool
    dtype: str


@dataclass(frozen=True)
class Generated:
    images: list[Image]
    applied: AppliedOptions


@dataclass(frozen=True)
class Vram:
    total_bytes: int = 0
    free_bytes: int = 0


@dataclass(frozen=True)
class ModelStates:
    ready: list[str] = field(default_factory=list)
    # model -> why it failed to load
    failed: dict[str, str] = field(default_factory=dict)


class RunError(Exception):
    def __str__(self) -> str:
        return self.message

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else type(self).__name__


class Cancelled(RunError):
    """The job was cancelled; `step` is the last denoising step that completed."""

    def __init__(self, step: int) -> None:
        super().__init__(step)
        self.step = step

    @property
    def message(self) -> str:
        return f"cancelled after step {self.step}"


class ModelLoadError(RunError):
    """A model could not be built or loaded from its source, or is not loaded here."""

    def __init__(self, model: str, message: str) -> None:
        super().__init__(model, message)
        self.model = model

    @property
    def message(self) -> str:
        return str(self.args[1])


class OutOfMemory(RunError):
    def __init__(
        self,
        message: str,
        vram_total_bytes: int,
        vram_free_bytes: int,
        vram_needed_bytes: int,
        memory_savers: bool,
    ) -> None:
        super().__init__(message, vram_total_bytes, vram_free_bytes, vram_needed_bytes, memory_savers)
        self.vram_total_bytes = vram_total_bytes
        self.vram_free_bytes = vram_free_bytes
        # 0 when the allocator's message did not say
        self.vram_needed_bytes = vram_needed_bytes
        self.memory_savers = memory_savers


class WorkerCrashed(RunError):
    """The child process died mid-run; `exit_code` is negative for a signal, as in `Popen`."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(exit_code)
        self.exit_code = exit_code

    @property
    def signal(self) -> int | None:
        return -self.exit_code if self.exit_code < 0 else None

    @property
    def message(self) -> str:
        if self.signal is not None:
            return f"the process running the pipeline was killed by {signal.Signals(self.signal).name}"
        return f"the process running the pipeline exited with code {self.exit_code}"


class ExecutionTimeout(RunError):
    def __init__(self, timeout_s: float, step: int) -> None:
        super().__init__(timeout_s, step)
        self.timeout_s = timeout_s
        # the last denoising step that completed
        self.step = step

    @property
    def message(self) -> str:
        return f"the pipeline ran longer than its execution timeout of {self.timeout_s:g} s and was stopped"


class InvalidOutput(RunError):
    def __init__(self, check: str, full_precision: bool) -> None:
        super().__init__(check, full_precision)
        # "nan_latents" or "black_image"
        self.check = check
        self.full_precision = full_precision

    @property
    def message(self) -> str:
        what = "NaN latents" if self.check == "nan_latents" else "an all-black image"
        return f"the pipeline produced {what}"


class PipelineError(RunError):
    """Anything else the pipeline raised, already logged in full where it happened."""


class PipelineRunner(Protocol):
    device: str

    async def start(self) -> None:
        """Loads the configured models; those that fail show up in `models().failed`."""

    def models(self) -> ModelStates: ...

    def vram(self) -> Vram:
        """The latest reading of the GPU's memory (0/0 on a CPU)."""

    async def run(
        self,
        model: str,
        spec: TextToImage,
        on_step: ProgressFn,
        cancel: asyncio.Event,
        options: RunOptions = PLAIN,
        *,
        attempt: int = 1,
        execution_timeout_s: float = 0.0,
        job_id: str = "",
    ) -> Generated:
        """Generate `spec.num_images` PNGs, waiting for a free slot first; raises a `RunError`.

        `attempt` picks the injected faults that apply; `execution_timeout_s` (0 = none) counts from
        when the run gets its slot; `job_id` only labels logs.
        """

    async def close(self) -> None:
        """Stops the pipelines; runs still in flight fail."""
