"""gRPC edge of the public API: authenticate from metadata, then call `JobsApi`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.api import httpbody_pb2
from kiln.v1 import job_service_pb2 as pb
from kiln.v1 import job_service_pb2_grpc as pb_grpc

from libs.api_keys import Principal
from libs.errors import Unauthenticated
from libs.rpc_status import grpc_boundary
from services.gateway.auth import Authenticator
from services.gateway.jobs_api import JobsApi

Ctx = grpc.aio.ServicerContext[Any, Any]


class JobServiceServicer(pb_grpc.JobServiceServicer):
    def __init__(self, api: JobsApi, authenticate: Authenticator) -> None:
        self._api = api
        self._authenticate = authenticate

    async def _principal(self, context: Ctx) -> Principal:
        values = [v for k, v in context.invocation_metadata() or () if k == "authorization"]
        if len(values) > 1:  # which one would count is anyone's guess: refuse rather than pick
            raise Unauthenticated("send exactly one authorization entry", reason="API_KEY_MALFORMED")
        value = values[0] if values else None
        return await self._authenticate(value if isinstance(value, str) else None)

    @grpc_boundary
    async def CreateJob(self, request: pb.CreateJobRequest, context: Ctx) -> pb.CreateJobResponse:
        return await self._api.CreateJob(await self._principal(context), request)

    @grpc_boundary
    async def GetJob(self, request: pb.GetJobRequest, context: Ctx) -> pb.GetJobResponse:
        return await self._api.GetJob(await self._principal(context), request)

    @grpc_boundary
    async def ListJobs(self, request: pb.ListJobsRequest, context: Ctx) -> pb.ListJobsResponse:
        return await self._api.ListJobs(await self._principal(context), request)

    @grpc_boundary
    async def CancelJob(self, request: pb.CancelJobRequest, context: Ctx) -> pb.CancelJobResponse:
        return await self._api.CancelJob(await self._principal(context), request)

    @grpc_boundary
    async def WatchJob(self, request: pb.WatchJobRequest, context: Ctx) -> AsyncIterator[pb.WatchJobResponse]:
        async for event in self._api.WatchJob(await self._principal(context), request):
            yield event

    @grpc_boundary
    async def ReadArtifact(
        self, request: pb.ReadArtifactRequest, context: Ctx
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        async for chunk in self._api.ReadArtifact(await self._principal(context), request):
            yield chunk
