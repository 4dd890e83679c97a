"""gRPC edge of the scheduler for the gateway: decode, call `Jobs`, encode."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import grpc
from kiln.scheduler.v1 import scheduler_service_pb2 as pb
from kiln.scheduler.v1 import scheduler_service_pb2_grpc as pb_grpc
from kiln.v1 import job_service_pb2

from libs.convert import job_to_pb, spec_from_pb
from libs.names import parse_artifact, parse_job
from libs.rpc_status import grpc_boundary
from services.scheduler.jobs import Estimate, Jobs

Ctx = grpc.aio.ServicerContext[Any, Any]


class SchedulerApi(pb_grpc.SchedulerServiceServicer):
    def __init__(self, jobs: Jobs) -> None:
        self._jobs = jobs

    @grpc_boundary
    async def SubmitJob(self, request: pb.SubmitJobRequest, context: Ctx) -> pb.SubmitJobResponse:
        record, replayed = await self._jobs.submit(
            request.tenant,
            request.tier,
            request.job.model,
            spec_from_pb(request.job.text_to_image),
            request_id=request.request_id,
            api_key_id=request.api_key_id,
            fingerprint=request.request_fingerprint,
            traceparent=request.traceparent,
            queue_timeout_ms=request.job.queue_timeout.ToMilliseconds(),
        )
        return pb.SubmitJobResponse(job=job_to_pb(record), replayed=replayed)

    @grpc_boundary
    async def EstimateJob(self, request: pb.EstimateJobRequest, context: Ctx) -> pb.EstimateJobResponse:
        estimate = await self._jobs.estimate(
            request.tenant, request.tier, request.job.model, spec_from_pb(request.job.text_to_image)
        )
        return pb.EstimateJobResponse(estimate=estimate_to_pb(estimate))

    @grpc_boundary
    async def GetJob(self, request: pb.GetJobRequest, context: Ctx) -> pb.GetJobResponse:
        return pb.GetJobResponse(job=job_to_pb(await self._jobs.get(request.tenant, parse_job(request.name))))

    @grpc_boundary
    async def ListJobs(self, request: pb.ListJobsRequest, context: Ctx) -> pb.ListJobsResponse:
        jobs, token = await self._jobs.list_jobs(request.tenant, request.page_size, request.page_token)
        return pb.ListJobsResponse(jobs=[job_to_pb(j) for j in jobs], next_page_token=token)

    @grpc_boundary
    async def CancelJob(self, request: pb.CancelJobRequest, context: Ctx) -> pb.CancelJobResponse:
        record = await self._jobs.cancel(request.tenant, parse_job(request.name))
        return pb.CancelJobResponse(job=job_to_pb(record))

    @grpc_boundary
    async def WatchJob(self, request: pb.WatchJobRequest, context: Ctx) -> AsyncIterator[pb.WatchJobResponse]:
        async for event_id, record in self._jobs.watch(
            request.tenant, parse_job(request.name), request.after_event_id
        ):
            yield pb.WatchJobResponse(event_id=event_id, job=job_to_pb(record))

    @grpc_boundary
    async def ReadArtifact(
        self, request: pb.ReadArtifactRequest, context: Ctx
    ) -> AsyncIterator[pb.ReadArtifactResponse]:
        job_id, index = parse_artifact(request.name)
        mime_type, size, chunks = await self._jobs.artifact(request.tenant, job_id, index)
        async for data in chunks:
            yield pb.ReadArtifactResponse(data=data, mime_type=mime_type, size_bytes=size)


def estimate_to_pb(estimate: Estimate) -> job_service_pb2.EstimateJobResponse:
    reply = job_service_pb2.EstimateJobResponse(
        cost_units=estimate.cost,
        admissible_now=estimate.admissible,
        limiting_policy=estimate.limiting_policy,
        queued_units=estimate.queued_cu,
        service_rate=estimate.service_rate,
    )
    reply.retry_after.FromMilliseconds(math.ceil(estimate.retry_after_s * 1000))
    reply.expected_wait.FromMilliseconds(math.ceil(estimate.expected_wait_s * 1000))
    return reply
