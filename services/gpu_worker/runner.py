"""The seam between the worker's job loop and the code that runs a diffusers pipeline.

The job loop only sees `PipelineRunner`; today `ThreadRunner` (in `thread_runner.py`) runs the
pipeline in a thread of this process, and a child-process runner can replace it without the loop
changing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from libs.jobs import TextToImage

# Called from the pipeline's own thread after each denoising step with (step, total_steps).
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class Image:
    png: bytes
    sha256: str
    seed: int
    width: int
    height: int


class Cancelled(Exception):
    """The job was cancelled; `step` is the last denoising step that completed."""

    def __init__(self, step: int) -> None:
        super().__init__(f"cancelled after step {step}")
        self.step = step


class ModelLoadError(Exception):
    """A model could not be built or loaded from its source."""


class PipelineRunner(Protocol):
    device: str

    async def load(self, model: str) -> None:
        """Load `model` (idempotent); raises `ModelLoadError`."""

    async def run(
        self, model: str, spec: TextToImage, on_step: ProgressFn, cancel: threading.Event
    ) -> list[Image]:
        """Generate `spec.num_images` PNGs; raises `Cancelled` when `cancel` is set mid-run."""

    async def close(self) -> None:
        """Waits until no pipeline is running; in-flight runs must have been cancelled first."""
