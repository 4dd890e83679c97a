"""The job as every service sees it: plain values, no transport types.

The gateway validates a `TextToImage`, the scheduler stores a `JobRecord`, and the worker runs the
`TextToImage` it was assigned. Conversion to and from protobuf lives in `libs.convert`.
"""

from __future__ import annotations

import enum
import os
import time
from dataclasses import dataclass, field

_ULID_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


class State(enum.Enum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (State.SUCCEEDED, State.FAILED, State.CANCELLED)


@dataclass(frozen=True)
class TextToImage:
    """A validated text-to-image request; every field is resolved (no defaults left to apply)."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    num_images: int

    def image_seeds(self) -> list[int]:
        """Image i is generated from seed + i, so each image can be reproduced on its own."""
        return [self.seed + i for i in range(self.num_images)]


@dataclass(frozen=True)
class Artifact:
    index: int
    mime_type: str
    size_bytes: int
    sha256: str
    seed: int
    width: int
    height: int


@dataclass(frozen=True)
class JobError:
    """A terminal failure as the client sees it: a canonical code name, a message and a reason."""

    code: str
    message: str
    reason: str
    metadata: dict[str, str] = field(default_factory=dict)


class Route(enum.Enum):
    """How a worker is asked to run an attempt; retries after GPU failures take a fallback route."""

    STANDARD = "STANDARD"
    MEMORY_SAVERS = "MEMORY_SAVERS"  # attention slicing and VAE tiling
    LARGER_GPU = "LARGER_GPU"  # memory savers, on a worker with more free VRAM
    FULL_PRECISION = "FULL_PRECISION"  # float32, after NaN latents or an all-black image

    @property
    def memory_savers(self) -> bool:
        return self in (Route.MEMORY_SAVERS, Route.LARGER_GPU)

    @property
    def full_precision(self) -> bool:
        return self is Route.FULL_PRECISION


class AttemptOutcome(enum.Enum):
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    RELEASED = "RELEASED"  # handed back unfinished, not by a failure of its own


@dataclass(frozen=True)
class Attempt:
    """One hand-over of a job to a worker."""

    attempt: int
    worker: str
    route: Route
    outcome: AttemptOutcome
    error: JobError | None = None
    start_ms: int = 0
    end_ms: int = 0


@dataclass(frozen=True)
class JobRecord:
    id: str
    tenant: str
    model: str
    spec: TextToImage
    state: State
    step: int = 0
    total_steps: int = 0
    attempt: int = 0
    create_ms: int = 0
    start_ms: int = 0
    end_ms: int = 0
    artifacts: tuple[Artifact, ...] = ()
    error: JobError | None = None
    cancel_requested: bool = False
    # W3C trace context of the request that created the job.
    traceparent: str = ""
    tier: str = ""
    cost: int = 0
    queue_timeout_ms: int = 0
    attempts: tuple[Attempt, ...] = ()
    # The route the next (or current) attempt takes.
    route: Route = Route.STANDARD
    # Failures so far by ErrorInfo reason, for the per-reason attempt limits.
    failures: dict[str, int] = field(default_factory=dict)
    # The smallest free VRAM (bytes) a worker needs to take the next attempt; 0 for any.
    min_vram_bytes: int = 0
    # Ended FAILED after its retries: it sits on the dead-letter list until an operator acts.
    dead_letter: bool = False
    refunded: bool = False

    @property
    def name(self) -> str:
        return job_name(self.id)


def job_name(job_id: str) -> str:
    return f"jobs/{job_id}"


def artifact_name(job_id: str, index: int) -> str:
    return f"jobs/{job_id}/artifacts/{index}"


def new_job_id() -> str:
    """A 26-character, lexically time-ordered id (ULID layout), so listing by id lists by age."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_ULID_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))
