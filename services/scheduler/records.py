"""How a `JobRecord` is laid out as the fields of a Redis hash (and of each event snapshot)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from libs.jobs import Artifact, Attempt, AttemptOutcome, JobError, JobRecord, Route, State, TextToImage
from libs.ratelimit import CU_POLICIES, Policy


def spec_fields(spec: TextToImage) -> dict[str, str]:
    return {"spec": json.dumps(dataclasses.asdict(spec), ensure_ascii=False, separators=(",", ":"))}


def artifacts_field(artifacts: list[Artifact]) -> str:
    return json.dumps([dataclasses.asdict(a) for a in artifacts], separators=(",", ":"))


def error_field(error: JobError) -> str:
    return json.dumps(dataclasses.asdict(error), ensure_ascii=False, separators=(",", ":"))


def attempt_open(attempt: int, worker: str, route: Route) -> str:
    """The attempt entry the transition script appends (it adds start_ms)."""
    return json.dumps(
        {"attempt": attempt, "worker": worker, "route": route.value, "outcome": AttemptOutcome.RUNNING.value},
        separators=(",", ":"),
    )


def attempt_close(outcome: AttemptOutcome, error: JobError | None = None) -> str:
    """What the transition script merges into the open attempt (it adds end_ms)."""
    closing: dict[str, object] = {"outcome": outcome.value}
    if error is not None:
        closing["error"] = dataclasses.asdict(error)
    return json.dumps(closing, ensure_ascii=False, separators=(",", ":"))


def failures_field(failures: dict[str, int]) -> str:
    return json.dumps(failures, sort_keys=True, separators=(",", ":"))


def _attempt(raw: dict[str, Any]) -> Attempt:
    error = raw.get("error")
    return Attempt(
        attempt=int(raw["attempt"]),
        worker=str(raw.get("worker", "")),
        route=Route(raw.get("route", Route.STANDARD.value)),
        outcome=AttemptOutcome(raw.get("outcome", AttemptOutcome.RUNNING.value)),
        error=JobError(**error) if isinstance(error, dict) else None,
        start_ms=int(raw.get("start_ms", 0)),
        end_ms=int(raw.get("end_ms", 0)),
    )


def new_job_fields(
    job_id: str,
    tenant: str,
    model: str,
    spec: TextToImage,
    traceparent: str,
    tier: str,
    queue_timeout_ms: int,
    policies: Sequence[Policy] = (),
) -> dict[str, str]:
    # What a refund may give back: each compute-unit policy's unit time, as charged at admission.
    charges = {p.name: p.interval_ms for p in policies if p.name in CU_POLICIES}
    return {
        "id": job_id,
        "tenant": tenant,
        "model": model,
        "state": State.QUEUED.value,
        "step": "0",
        "total_steps": str(spec.steps),
        "attempt": "0",
        "traceparent": traceparent,
        "tier": tier,
        "queue_timeout_ms": str(queue_timeout_ms),
        "charges": json.dumps(charges, separators=(",", ":")),
        **spec_fields(spec),
    }


def from_fields(fields: dict[str, str]) -> JobRecord:
    error = json.loads(fields["error"]) if fields.get("error") else None
    return JobRecord(
        id=fields["id"],
        tenant=fields["tenant"],
        model=fields["model"],
        spec=TextToImage(**json.loads(fields["spec"])),
        state=State(fields["state"]),
        step=int(fields.get("step", 0)),
        total_steps=int(fields.get("total_steps", 0)),
        attempt=int(fields.get("attempt", 0)),
        create_ms=int(fields.get("create_ms", 0)),
        start_ms=int(fields.get("start_ms", 0)),
        end_ms=int(fields.get("end_ms", 0)),
        artifacts=tuple(Artifact(**a) for a in json.loads(fields.get("artifacts") or "[]")),
        error=JobError(**error) if error else None,
        cancel_requested=fields.get("cancel_requested") == "1",
        traceparent=fields.get("traceparent", ""),
        tier=fields.get("tier", ""),
        cost=int(fields.get("cost", 0)),
        queue_timeout_ms=int(fields.get("queue_timeout_ms", 0)),
        attempts=tuple(_attempt(a) for a in _json_list(fields.get("attempts"))),
        route=Route(fields.get("route") or Route.STANDARD.value),
        failures={str(k): int(v) for k, v in json.loads(fields.get("failures") or "{}").items()},
        min_vram_bytes=int(fields.get("min_vram_bytes") or 0),
        dead_letter=fields.get("dead_letter") == "1",
        refunded=fields.get("refunded") == "1",
    )


def _json_list(text: str | None) -> list[dict[str, Any]]:
    # cjson encodes an empty array as an empty object.
    value = json.loads(text or "[]")
    return value if isinstance(value, list) else []


def decode(raw: dict[bytes, bytes] | list[bytes]) -> dict[str, str]:
    """HGETALL gives a dict, an XREAD entry a flat list; both hold UTF-8 text."""
    if isinstance(raw, dict):
        return {k.decode(): v.decode() for k, v in raw.items()}
    return {raw[i].decode(): raw[i + 1].decode() for i in range(0, len(raw), 2)}
