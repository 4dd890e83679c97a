"""What the worker and a pipeline child process say to each other over their pipe (pickled)."""

from __future__ import annotations

from dataclasses import dataclass

from libs.jobs import TextToImage
from services.gpu_worker.runner import Generated, RunError, RunOptions, Vram

# Worker to child.


@dataclass(frozen=True)
class Run:
    run_id: int
    job_id: str
    attempt: int
    model: str
    spec: TextToImage
    options: RunOptions


@dataclass(frozen=True)
class Cancel:
    run_id: int


@dataclass(frozen=True)
class Stop:
    pass


# Child to worker.


@dataclass(frozen=True)
class Ready:
    models: list[str]
    failed: dict[str, str]
    vram: Vram


@dataclass(frozen=True)
class Step:
    run_id: int
    step: int
    total: int


@dataclass(frozen=True)
class Outcome:
    """The end of a run: images, or the `RunError` it failed with."""

    run_id: int
    result: Generated | RunError
    vram: Vram


ToChild = Run | Cancel | Stop
FromChild = Ready | Step | Outcome
