"""gRPC edge of the public API: authenticate from metadata, then call `JobsApi`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.api import httpbody_pb2
from kiln.v1 import job_service_pb2 as pb
from kiln.v1 import job_service_pb2_grpc as pb_grpc
from redis.exceptions import RedisError

from libs.api_keys import Principal
from libs.errors import Unauthenticated
from libs.rpc_status import grpc_boundary
from services.gateway import reply_metadata
from services.gateway.auth import Authenticator
from services.gateway.drain import Drain
from services.gateway.jobs_api import JobsApi

Ctx = grpc.aio.ServicerContext[Any, Any]
log = logging.getLogger(__name__)


QuotaHeaders = Callable[[Principal], Awaitable[dict[str, str]]]
Req = TypeVar("Req")
Resp = TypeVar("Resp")


class JobServiceServicer(pb_grpc.JobServiceServicer):
    """Every authenticated call answers with the caller's rate-limit state as initial metadata,
    plus what the method added through `reply_metadata` (`idempotent-replayed: true`). Once the
    drain has begun, new calls are refused with UNAVAILABLE (SHUTTING_DOWN): the server keeps
    running until those in flight are done, so that no call is cut off unanswered."""

    def __init__(
        self, api: JobsApi, authenticate: Authenticator, quota_headers: QuotaHeaders, drain: Drain
    ) -> None:
        self._api = api
        self._authenticate = authenticate
        self._quota_headers = quota_headers
        self._drain = drain

    async def _principal(self, context: Ctx) -> Principal:
        values = [v for k, v in context.invocation_metadata() or () if k == "authorization"]
        if len(values) > 1:  # which one would count is anyone's guess: refuse rather than pick
            raise Unauthenticated("send exactly one authorization entry", reason="API_KEY_MALFORMED")
        value = values[0] if values else None
        return await self._authenticate(value if isinstance(value, str) else None)

    async def _send_quota(self, context: Ctx, principal: Principal, extra: dict[str, str]) -> None:
        try:
            quota = await self._quota_headers(principal)
        except RedisError as exc:  # a courtesy: a job just made must not be reported as a failure
            log.warning("rate-limit metadata left out: %s", exc)
            quota = {}
        headers = {**quota, **extra}
        await context.send_initial_metadata(tuple((k.lower(), v) for k, v in headers.items()))

    async def _unary(
        self, context: Ctx, request: Req, method: Callable[[Principal, Req], Awaitable[Resp]]
    ) -> Resp:
        with self._drain.track():
            principal = await self._principal(context)
            with reply_metadata.collect() as extra:
                try:
                    return await method(principal, request)
                finally:  # after the call, so a CreateJob's own spend shows; errors carry it too
                    await self._send_quota(context, principal, extra)

    async def _stream(
        self, context: Ctx, request: Req, method: Callable[[Principal, Req], AsyncIterator[Resp]]
    ) -> AsyncIterator[Resp]:
        with self._drain.track():
            principal = await self._principal(context)
            await self._send_quota(context, principal, {})
            async for item in method(principal, request):
                yield item

    @grpc_boundary
    async def CreateJob(self, request: pb.CreateJobRequest, context: Ctx) -> pb.CreateJobResponse:
        return await self._unary(context, request, self._api.CreateJob)

    @grpc_boundary
    async def EstimateJob(self, request: pb.EstimateJobRequest, context: Ctx) -> pb.EstimateJobResponse:
        return await self._unary(context, request, self._api.EstimateJob)

    @grpc_boundary
    async def GetJob(self, request: pb.GetJobRequest, context: Ctx) -> pb.GetJobResponse:
        return await self._unary(context, request, self._api.GetJob)

    @grpc_boundary
    async def ListJobs(self, request: pb.ListJobsRequest, context: Ctx) -> pb.ListJobsResponse:
        return await self._unary(context, request, self._api.ListJobs)

    @grpc_boundary
    async def CancelJob(self, request: pb.CancelJobRequest, context: Ctx) -> pb.CancelJobResponse:
        return await self._unary(context, request, self._api.CancelJob)

    @grpc_boundary
    async def WatchJob(self, request: pb.WatchJobRequest, context: Ctx) -> AsyncIterator[pb.WatchJobResponse]:
        async for event in self._stream(context, request, self._api.WatchJob):
            yield event

    @grpc_boundary
    async def ReadArtifact(
        self, request: pb.ReadArtifactRequest, context: Ctx
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        async for chunk in self._stream(context, request, self._api.ReadArtifact):
            yield chunk
