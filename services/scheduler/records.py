"""How a `JobRecord` is laid out as the fields of a Redis hash (and of each event snapshot)."""

from __future__ import annotations

import dataclasses
import json

from libs.jobs import Artifact, JobError, JobRecord, State, TextToImage


def spec_fields(spec: TextToImage) -> dict[str, str]:
    return {"spec": json.dumps(dataclasses.asdict(spec), ensure_ascii=False, separators=(",", ":"))}


def artifacts_field(artifacts: list[Artifact]) -> str:
    return json.dumps([dataclasses.asdict(a) for a in artifacts], separators=(",", ":"))


def error_field(error: JobError) -> str:
    return json.dumps(dataclasses.asdict(error), ensure_ascii=False, separators=(",", ":"))


def new_job_fields(
    job_id: str,
    tenant: str,
    model: str,
    spec: TextToImage,
    traceparent: str,
    tier: str,
    queue_timeout_ms: int,
) -> dict[str, str]:
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
    )


def decode(raw: dict[bytes, bytes] | list[bytes]) -> dict[str, str]:
    """HGETALL gives a dict, an XREAD entry a flat list; both hold UTF-8 text."""
    if isinstance(raw, dict):
        return {k.decode(): v.decode() for k, v in raw.items()}
    return {raw[i].decode(): raw[i + 1].decode() for i in range(0, len(raw), 2)}
