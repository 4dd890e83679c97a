"""The public JobService, once for both transports: each method takes the authenticated principal
and a `kiln.v1` request, and returns the response (or an async iterator of them for streams).

The gRPC servicer and the REST edge both call these methods by their RPC names. A method that has
more to say than its response (a CreateJob replayed for its request id) says it through
`reply_metadata`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from google.api import httpbody_pb2
from kiln.scheduler.v1 import scheduler_service_pb2 as spb
from kiln.scheduler.v1 import scheduler_service_pb2_grpc as spb_grpc
from kiln.v1 import job_pb2
from kiln.v1 import job_service_pb2 as pb
from opentelemetry.trace import SpanKind

from libs.api_keys import Principal
from libs.catalog import ModelSpec
from libs.convert import spec_to_pb
from libs.telemetry import current_traceparent, tracer
from libs.tiers import Tier, tier_of
from services.gateway import reply_metadata
from services.gateway.drain import Drain
from services.gateway.validation import check_request_id, fingerprint, resolve


class JobsApi:
    def __init__(
        self,
        scheduler: spb_grpc.SchedulerServiceStub,
        catalog: dict[str, ModelSpec],
        tiers: dict[str, Tier],
        *,
        timeout_s: float,
        drain: Drain | None = None,
    ) -> None:
        self._drain = drain or Drain()
        self._scheduler = scheduler
        self._catalog = catalog
        self._tiers = tiers
        self._timeout_s = timeout_s

    async def CreateJob(self, principal: Principal, request: pb.CreateJobRequest) -> pb.CreateJobResponse:
        with tracer(__name__).start_as_current_span(
            "CreateJob", kind=SpanKind.SERVER, attributes={"kiln.tenant": principal.tenant}
        ) as span:
            check_request_id(request.request_id)
            model, spec = resolve(
                request.job, self._catalog, principal.tier, tier_of(self._tiers, principal.tier)
            )
            span.set_attribute("kiln.model", model)
            resolved = job_pb2.Job(model=model, text_to_image=spec_to_pb(spec))
            if request.job.HasField("queue_timeout"):
                resolved.queue_timeout.CopyFrom(request.job.queue_timeout)
            reply = await self._scheduler.SubmitJob(
                spb.SubmitJobRequest(
                    tenant=principal.tenant,
                    tier=principal.tier,
                    job=resolved,
                    request_id=request.request_id,
                    api_key_id=principal.key_id,
                    request_fingerprint=fingerprint(request.job),
                    traceparent=current_traceparent(),
                ),
                timeout=self._timeout_s,
            )
            span.set_attribute("kiln.job", reply.job.name)
            span.set_attribute("kiln.replayed", reply.replayed)
            if reply.replayed:
                reply_metadata.add(reply_metadata.IDEMPOTENT_REPLAYED, "true")
            return pb.CreateJobResponse(job=reply.job)

    async def EstimateJob(
        self, principal: Principal, request: pb.EstimateJobRequest
    ) -> pb.EstimateJobResponse:
        model, spec = resolve(
            request.job, self._catalog, principal.tier, tier_of(self._tiers, principal.tier)
        )
        reply = await self._scheduler.EstimateJob(
            spb.EstimateJobRequest(
                tenant=principal.tenant,
                tier=principal.tier,
                job=job_pb2.Job(model=model, text_to_image=spec_to_pb(spec)),
            ),
            timeout=self._timeout_s,
        )
        return reply.estimate

    async def GetJob(self, principal: Principal, request: pb.GetJobRequest) -> pb.GetJobResponse:
        reply = await self._scheduler.GetJob(
            spb.GetJobRequest(tenant=principal.tenant, name=request.name), timeout=self._timeout_s
        )
        return pb.GetJobResponse(job=reply.job)

    async def ListJobs(self, principal: Principal, request: pb.ListJobsRequest) -> pb.ListJobsResponse:
        reply = await self._scheduler.ListJobs(
            spb.ListJobsRequest(
                tenant=principal.tenant, page_size=request.page_size, page_token=request.page_token
            ),
            timeout=self._timeout_s,
        )
        return pb.ListJobsResponse(jobs=reply.jobs, next_page_token=reply.next_page_token)

    async def CancelJob(self, principal: Principal, request: pb.CancelJobRequest) -> pb.CancelJobResponse:
        reply = await self._scheduler.CancelJob(
            spb.CancelJobRequest(tenant=principal.tenant, name=request.name), timeout=self._timeout_s
        )
        return pb.CancelJobResponse(job=reply.job)

    def WatchJob(
        self, principal: Principal, request: pb.WatchJobRequest
    ) -> AsyncIterator[pb.WatchJobResponse]:
        """Ends with UNAVAILABLE (SHUTTING_DOWN) when the gateway begins to shut down; the client
        reattaches from its last event id."""
        return self._drain.until_begun(self._relay_watch(principal, request))

    async def _relay_watch(
        self, principal: Principal, request: pb.WatchJobRequest
    ) -> AsyncIterator[pb.WatchJobResponse]:
        call = self._scheduler.WatchJob(
            spb.WatchJobRequest(
                tenant=principal.tenant, name=request.name, after_event_id=request.after_event_id
            )
        )
        try:
            async for event in call:
                yield pb.WatchJobResponse(event_id=event.event_id, job=event.job)
        finally:
            call.cancel()

    async def ReadArtifact(
        self, principal: Principal, request: pb.ReadArtifactRequest
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        call = self._scheduler.ReadArtifact(
            spb.ReadArtifactRequest(tenant=principal.tenant, name=request.name)
        )
        try:
            async for chunk in call:
                yield httpbody_pb2.HttpBody(content_type=chunk.mime_type, data=chunk.data)
        finally:
            call.cancel()
