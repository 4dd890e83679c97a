"""Wires the gateway together: API keys in Redis, the scheduler client, gRPC and REST servers."""

from __future__ import annotations

import asyncio

import grpc
from aiohttp import web
from kiln.scheduler.v1 import scheduler_service_pb2_grpc
from kiln.v1 import job_service_pb2, job_service_pb2_grpc
from redis.asyncio import BlockingConnectionPool, Redis

from libs.api_keys import ApiKeys, Principal
from libs.ratelimit import header_fields, read_status
from libs.serving import GRPC_OPTIONS, serve, start_grpc
from libs.settings import GatewaySettings
from services.gateway import http_logging
from services.gateway.auth import Authenticator
from services.gateway.grpc_api import JobServiceServicer
from services.gateway.jobs_api import JobsApi
from services.gateway.openapi import build_openapi
from services.gateway.rest import build_rest_app

JOB_SERVICE = job_service_pb2.DESCRIPTOR.services_by_name["JobService"]


class GatewayApp:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        # A blocking pool: a burst waits for a connection instead of failing the request.
        self.redis = Redis.from_pool(  # from_pool: closing the client closes the pool
            BlockingConnectionPool.from_url(
                settings.redis_url,
                max_connections=200,
                timeout=settings.redis_socket_timeout_seconds,
                socket_timeout=settings.redis_socket_timeout_seconds,
            )
        )
        self.channel = grpc.aio.insecure_channel(settings.scheduler_address, options=GRPC_OPTIONS)
        self.tiers = settings.tier_table()
        self.api = JobsApi(
            scheduler_service_pb2_grpc.SchedulerServiceStub(self.channel),
            settings.catalog(),
            self.tiers,
            timeout_s=settings.scheduler_timeout_seconds,
        )
        self.authenticate = Authenticator(ApiKeys(self.redis))
        self.grpc_port = 0
        self.http_port = 0
        self._server: grpc.aio.Server | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        http_logging.install()
        servicer = JobServiceServicer(self.api, self.authenticate, self.quota_headers)
        self._server, self.grpc_port, _ = await start_grpc(
            self.settings.gateway_host,
            self.settings.gateway_grpc_port,
            [lambda s: job_service_pb2_grpc.add_JobServiceServicer_to_server(servicer, s)],
            [JOB_SERVICE.full_name],
        )
        openapi = build_openapi(JOB_SERVICE, title="Kiln API", version="v1")
        app = build_rest_app(
            JOB_SERVICE,
            self.api,
            self.authenticate,
            openapi,
            max_body_bytes=self.settings.max_body_bytes,
            response_headers=self.quota_headers,
        )
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.gateway_host, self.settings.gateway_http_port)
        await site.start()
        self.http_port = self._runner.addresses[0][1]

    async def quota_headers(self, principal: Principal) -> dict[str, str]:
        """RateLimit-Policy and RateLimit for the caller, read from the policies' state in Redis."""
        tier = self.tiers.get(principal.tier)
        if tier is None:
            return {}
        return header_fields(await read_status(self.redis, principal.tenant, tier))

    def ready_info(self) -> dict[str, int]:
        return {"grpc": self.grpc_port, "http": self.http_port}

    async def stop(self, grace: float = 5.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
        if self._runner is not None:
            await self._runner.cleanup()
        await self.channel.close()
        await self.redis.aclose()


async def main() -> None:
    settings = GatewaySettings()
    await serve("gateway", settings, GatewayApp(settings))


if __name__ == "__main__":
    asyncio.run(main())
