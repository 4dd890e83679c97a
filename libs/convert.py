"""to_pb/from_pb between the plain job values of `libs.jobs` and the `kiln.v1` messages."""

from __future__ import annotations

from google.protobuf import timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from kiln.v1 import job_pb2

from libs.errors import DOMAIN
from libs.jobs import Artifact, Attempt, JobError, JobRecord, State, TextToImage, artifact_name

_STATE_TO_PB = {
    State.QUEUED: job_pb2.Job.STATE_QUEUED,
    State.RUNNING: job_pb2.Job.STATE_RUNNING,
    State.SUCCEEDED: job_pb2.Job.STATE_SUCCEEDED,
    State.FAILED: job_pb2.Job.STATE_FAILED,
    State.CANCELLED: job_pb2.Job.STATE_CANCELLED,
}
_STATE_FROM_PB = {v: k for k, v in _STATE_TO_PB.items()}


def state_from_pb(state: job_pb2.Job.State.ValueType) -> State:
    return _STATE_FROM_PB[state]


def spec_to_pb(spec: TextToImage) -> job_pb2.TextToImage:
    return job_pb2.TextToImage(
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        width=spec.width,
        height=spec.height,
        steps=spec.steps,
        guidance_scale=spec.guidance_scale,
        seed=spec.seed,
        num_images=spec.num_images,
    )


def spec_from_pb(pb: job_pb2.TextToImage) -> TextToImage:
    """For messages the gateway already resolved: every optional field is present."""
    return TextToImage(
        prompt=pb.prompt,
        negative_prompt=pb.negative_prompt,
        width=pb.width,
        height=pb.height,
        steps=pb.steps,
        guidance_scale=pb.guidance_scale,
        seed=pb.seed,
        num_images=pb.num_images,
    )


def error_to_pb(error: JobError) -> status_pb2.Status:
    status = status_pb2.Status(code=code_pb2.Code.Value(error.code), message=error.message)
    status.details.add().Pack(
        error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
    )
    return status


def error_from_pb(status: status_pb2.Status) -> JobError:
    reason, metadata = "UNKNOWN", {}
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
    # A failure reported as OK, or with a code that does not exist, is still a failure.
    code = code_pb2.Code.Name(status.code) if status.code in code_pb2.Code.values() else "UNKNOWN"
    if code == "OK":
        code = "UNKNOWN"
    return JobError(code, status.message or "no message", reason or "UNKNOWN", metadata)


def _timestamp(ms: int) -> timestamp_pb2.Timestamp | None:
    if not ms:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromMilliseconds(ms)
    return ts


def artifact_to_pb(job_id: str, artifact: Artifact) -> job_pb2.Artifact:
    return job_pb2.Artifact(
        name=artifact_name(job_id, artifact.index),
        mime_type=artifact.mime_type,
        size_bytes=artifact.size_bytes,
        sha256=artifact.sha256,
        seed=artifact.seed,
        width=artifact.width,
        height=artifact.height,
    )


def job_to_pb(record: JobRecord) -> job_pb2.Job:
    job = job_pb2.Job(
        name=record.name,
        model=record.model,
        text_to_image=spec_to_pb(record.spec),
        state=_STATE_TO_PB[record.state],
        progress=job_pb2.Progress(step=record.step, total_steps=record.total_steps),
        artifacts=[artifact_to_pb(record.id, a) for a in record.artifacts],
        attempt=record.attempt,
        cost_units=record.cost,
        create_time=_timestamp(record.create_ms),
        start_time=_timestamp(record.start_ms),
        end_time=_timestamp(record.end_ms),
    )
    if record.error is not None:
        job.error.CopyFrom(error_to_pb(record.error))
    if record.queue_timeout_ms:
        job.queue_timeout.FromMilliseconds(record.queue_timeout_ms)
    job.attempts.extend(attempt_to_pb(a) for a in record.attempts)
    return job


def attempt_to_pb(attempt: Attempt) -> job_pb2.Attempt:
    pb = job_pb2.Attempt(
        attempt=attempt.attempt,
        worker=attempt.worker,
        route=job_pb2.Attempt.Route.Value(f"ROUTE_{attempt.route.value}"),
        outcome=job_pb2.Attempt.Outcome.Value(f"OUTCOME_{attempt.outcome.value}"),
        start_time=_timestamp(attempt.start_ms),
        end_time=_timestamp(attempt.end_ms),
    )
    if attempt.error is not None:
        pb.error.CopyFrom(error_to_pb(attempt.error))
    return pb
