"""Injected GPU faults: the seam that lets tests make the real pipeline fail the way a GPU does.

Off unless the worker's own settings list rules (`faults`, env `KILN_FAULTS` as JSON); nothing in a
request can turn one on. A matching rule strikes inside the real denoising loop of the child process
(see `generate.py`), so the worker's real detection and recovery paths handle it:

    oom     raises a real torch.OutOfMemoryError
    crash   SIGKILLs the child process
    hang    blocks forever, deaf to cancel (as a stuck CUDA kernel is)
    nan     returns NaN latents from the step callback
    black   turns the decoded image all black

Kept free of torch so the settings can name `FaultRule` without loading it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

FaultKind = Literal["oom", "crash", "hang", "nan", "black"]


class FaultRule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: FaultKind
    # "" matches any prompt or model.
    prompt_contains: str = ""
    model: str = ""
    # Attempt numbers it strikes on; empty strikes on every attempt.
    attempts: list[int] = Field(default_factory=list)
    at_step: int = Field(default=1, ge=1)
    # Spare runs with that option on, so a test can show a fallback route gets past the fault.
    unless_full_precision: bool = False
    unless_memory_savers: bool = False
    # What the injected OOM says it tried to allocate (oom only).
    vram_needed_bytes: int = Field(default=2 << 30, ge=0)

    def matches(
        self, *, prompt: str, model: str, attempt: int, memory_savers: bool, full_precision: bool
    ) -> bool:
        return (
            self.prompt_contains in prompt
            and self.model in ("", model)
            and (not self.attempts or attempt in self.attempts)
            and not (self.unless_full_precision and full_precision)
            and not (self.unless_memory_savers and memory_savers)
        )


def first_match(
    rules: Sequence[FaultRule],
    *,
    prompt: str,
    model: str,
    attempt: int,
    memory_savers: bool,
    full_precision: bool,
) -> FaultRule | None:
    for rule in rules:
        if rule.matches(
            prompt=prompt,
            model=model,
            attempt=attempt,
            memory_savers=memory_savers,
            full_precision=full_precision,
        ):
            return rule
    return None


def oom_message(needed_bytes: int) -> str:
    """Worded as torch's caching allocator words it, so the worker parses it as it would a real one."""
    return (
        f"CUDA out of memory. Tried to allocate {needed_bytes / (1 << 30):.2f} GiB. "
        "(injected by a fault rule of this worker's settings)"
    )
