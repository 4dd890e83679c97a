"""What tools see before they call anything: gRPC health and reflection, and the OpenAPI document."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import Stack

pytestmark = pytest.mark.timeout(30)


async def test_grpc_health_and_reflection(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="kiln.v1.JobService")
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def one() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        services = [
            s.name
            async for reply in stub.ServerReflectionInfo(one())
            for s in reply.list_services_response.service
        ]
    assert "kiln.v1.JobService" in services
    assert "grpc.health.v1.Health" in services


async def test_openapi_document_is_served_without_a_key(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http, http.get(f"{stack.http_base}/openapi.json") as resp:
        assert resp.status == 200
        doc = await resp.json()
    assert doc["openapi"].startswith("3.")
    operations = {
        op["operationId"] for item in doc["paths"].values() for op in item.values() if isinstance(op, dict)
    }
    assert operations == {
        "CreateJob",
        "EstimateJob",
        "GetJob",
        "ListJobs",
        "CancelJob",
        "WatchJob",
        "ReadArtifact",
    }
