"""A small asyncio client for the public gRPC API, used by `kiln generate` and the examples."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType

import grpc
from kiln.v1 import job_pb2
from kiln.v1 import job_service_pb2 as pb
from kiln.v1 import job_service_pb2_grpc as pb_grpc

from libs.rpc_status import from_rpc_error
from libs.serving import GRPC_OPTIONS


class KilnClient:
    """Errors arrive as `libs.errors.KilnError` subclasses, with field violations and reasons."""

    def __init__(self, target: str, api_key: str) -> None:
        self._channel = grpc.aio.insecure_channel(target, options=GRPC_OPTIONS)
        self._stub = pb_grpc.JobServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),)
        self._peer = f"the Kiln gateway at {target}"

    async def __aenter__(self) -> KilnClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def create_job(self, job: job_pb2.Job, request_id: str = "") -> job_pb2.Job:
        try:
            reply = await self._stub.CreateJob(
                pb.CreateJobRequest(job=job, request_id=request_id), metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, self._peer) from None
        return reply.job

    async def get_job(self, name: str) -> job_pb2.Job:
        try:
            return (await self._stub.GetJob(pb.GetJobRequest(name=name), metadata=self._metadata)).job
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, self._peer) from None

    async def cancel_job(self, name: str) -> job_pb2.Job:
        try:
            return (await self._stub.CancelJob(pb.CancelJobRequest(name=name), metadata=self._metadata)).job
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, self._peer) from None

    async def watch(self, name: str, after_event_id: str = "") -> AsyncIterator[pb.WatchJobResponse]:
        call = self._stub.WatchJob(
            pb.WatchJobRequest(name=name, after_event_id=after_event_id), metadata=self._metadata
        )
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, self._peer) from None

    async def download(self, artifact_name: str) -> bytes:
        """The whole artifact, reassembled from its chunks."""
        parts: list[bytes] = []
        try:
            async for chunk in self._stub.ReadArtifact(
                pb.ReadArtifactRequest(name=artifact_name), metadata=self._metadata
            ):
                parts.append(chunk.data)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, self._peer) from None
        return b"".join(parts)
