"""Validation at the door: every field checked against the model's limits before anything is queued.

All violations are reported at once, each naming the field (as a path in the request) and the
values it allows.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import unicodedata

from kiln.v1 import job_pb2

from libs.catalog import ModelSpec
from libs.errors import FieldViolation, InvalidArgument
from libs.jobs import TextToImage
from libs.tiers import Tier

MAX_SEED = 2**63 - 1
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
_T2I = "job.text_to_image"


def _int_range(violations: list[FieldViolation], field: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        violations.append(FieldViolation(field, f"must be between {low} and {high}, got {value}"))


def _size(violations: list[FieldViolation], field: str, value: int, spec: ModelSpec) -> None:
    if not (spec.min_size <= value <= spec.max_size and value % spec.size_multiple == 0):
        violations.append(
            FieldViolation(
                field,
                f"must be a multiple of {spec.size_multiple} between {spec.min_size} and {spec.max_size} "
                f"for model {spec.name}, got {value}",
            )
        )


def _visible(text: str) -> bool:
    """Whether anything is left once spaces, format characters (zero-width joiners, direction
    marks) and lone combining marks are set aside."""
    return any(not ch.isspace() and unicodedata.category(ch) not in ("Cf", "Mn", "Me") for ch in text)


def _text(violations: list[FieldViolation], field: str, value: str, limit: int, *, required: bool) -> None:
    if required and not _visible(value):
        violations.append(FieldViolation(field, "must not be empty (or only spaces and invisible marks)"))
    elif len(value) > limit:
        violations.append(FieldViolation(field, f"must be at most {limit} characters, got {len(value)}"))


def _tier_limits(violations: list[FieldViolation], spec: TextToImage, tier_name: str, tier: Tier) -> None:
    """The tier's caps, checked once the model's rules hold (so each field gets one complaint)."""
    if spec.width * spec.height > tier.max_pixels:
        violations.append(
            FieldViolation(
                f"{_T2I}.width",
                f"width x height must be at most {tier.max_pixels} pixels on the {tier_name} tier, "
                f"got {spec.width}x{spec.height}",
            )
        )
    if spec.steps > tier.max_steps:
        violations.append(
            FieldViolation(
                f"{_T2I}.steps", f"must be at most {tier.max_steps} on the {tier_name} tier, got {spec.steps}"
            )
        )
    if spec.num_images > tier.max_num_images:
        violations.append(
            FieldViolation(
                f"{_T2I}.num_images",
                f"must be at most {tier.max_num_images} on the {tier_name} tier, got {spec.num_images}",
            )
        )


def resolve(
    job: job_pb2.Job, catalog: dict[str, ModelSpec], tier_name: str, tier: Tier
) -> tuple[str, TextToImage]:
    """Returns (model, fully resolved input) or raises InvalidArgument listing every violation."""
    spec = catalog.get(job.model)
    if spec is None:
        allowed = ", ".join(sorted(catalog))
        got = f"got {job.model!r}" if job.model else "got nothing"
        raise InvalidArgument(
            f"job.model: must be one of: {allowed}; {got}",
            reason="UNKNOWN_MODEL",
            metadata={"field": "job.model", "allowed": allowed},
            violations=[FieldViolation("job.model", f"must be one of: {allowed}; {got}")],
        )
    if job.WhichOneof("input") != "text_to_image":
        raise InvalidArgument.field(_T2I, "is required")
    t2i = job.text_to_image
    violations: list[FieldViolation] = []
    _text(violations, f"{_T2I}.prompt", t2i.prompt, spec.max_prompt_chars, required=True)
    _text(violations, f"{_T2I}.negative_prompt", t2i.negative_prompt, spec.max_prompt_chars, required=False)
    width = t2i.width if t2i.HasField("width") else spec.default_size
    height = t2i.height if t2i.HasField("height") else spec.default_size
    _size(violations, f"{_T2I}.width", width, spec)
    _size(violations, f"{_T2I}.height", height, spec)
    steps = t2i.steps if t2i.HasField("steps") else spec.default_steps
    _int_range(violations, f"{_T2I}.steps", steps, 1, spec.max_steps)
    num_images = t2i.num_images if t2i.HasField("num_images") else 1
    _int_range(violations, f"{_T2I}.num_images", num_images, 1, spec.max_num_images)
    guidance = t2i.guidance_scale if t2i.HasField("guidance_scale") else spec.default_guidance
    if not (math.isfinite(guidance) and spec.min_guidance <= guidance <= spec.max_guidance):
        violations.append(
            FieldViolation(
                f"{_T2I}.guidance_scale",
                f"must be between {spec.min_guidance:g} and {spec.max_guidance:g}, got {guidance:g}",
            )
        )
    seed = t2i.seed if t2i.HasField("seed") else secrets.randbelow(2**53)
    _int_range(violations, f"{_T2I}.seed", seed, 0, MAX_SEED - spec.max_num_images)
    resolved = TextToImage(
        prompt=t2i.prompt,
        negative_prompt=t2i.negative_prompt,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=guidance,
        seed=seed,
        num_images=num_images,
    )
    if job.HasField("queue_timeout"):
        timeout_s = job.queue_timeout.ToMilliseconds() / 1000
        if not 0 < timeout_s <= tier.max_queue_wait_s:
            violations.append(
                FieldViolation(
                    "job.queue_timeout",
                    f"must be more than 0 s and at most {tier.max_queue_wait_s:g} s on the {tier_name} tier, "
                    f"got {timeout_s:g} s",
                )
            )
    if not violations:
        _tier_limits(violations, resolved, tier_name, tier)
    if violations:
        first = violations[0]
        raise InvalidArgument(
            f"{first.field}: {first.description}"
            + (f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""),
            reason="INVALID_FIELD",
            metadata={"field": first.field},
            violations=violations,
        )
    return spec.name, resolved


def check_request_id(request_id: str) -> None:
    if request_id and not _REQUEST_ID.fullmatch(request_id):
        raise InvalidArgument.field(
            "request_id", "must be 1-128 printable ASCII characters without spaces (a UUID is typical)"
        )


def fingerprint(job: job_pb2.Job) -> str:
    """The job as the client sent it, before any default was filled in (a seed is drawn at random
    when none is given, so the resolved job of a retry differs)."""
    return hashlib.sha256(job.SerializeToString(deterministic=True)).hexdigest()
