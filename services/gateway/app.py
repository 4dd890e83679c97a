"""Wires the gateway together: API keys in Redis, the scheduler client, gRPC and REST servers."""

from __future__ import annotations

import asyncio
import logging

import grpc
from aiohttp import web
from grpc_health.v1 import health
from kiln.scheduler.v1 import scheduler_service_pb2_grpc
from kiln.v1 import job_service_pb2, job_service_pb2_grpc
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from libs.api_keys import ApiKeys, Principal
from libs.ratelimit import header_fields, read_status
from libs.serving import GRPC_OPTIONS, serve, start_grpc
from libs.settings import GatewaySettings
from services.gateway import http_logging
from services.gateway.auth import Authenticator
from services.gateway.drain import Drain
from services.gateway.grpc_api import JobServiceServicer
from services.gateway.jobs_api import JobsApi
from services.gateway.openapi import build_openapi
from services.gateway.rest import build_rest_app

JOB_SERVICE = job_service_pb2.DESCRIPTOR.services_by_name["JobService"]
log = logging.getLogger(__name__)
# A pooled Redis connection idle longer than this is pinged before use, so that one a Redis restart
# killed is replaced rather than failing the call given to it.
REDIS_HEALTH_CHECK_S = 1.0


def _redis(settings: GatewaySettings) -> Redis:
    """The gateway only reads Redis (API keys, rate-limit state), so a read whose connection broke
    is safely sent once more, on a new connection; a timeout is not retried. The pool blocks: a
    burst waits for a free connection instead of failing the request."""
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=200,
        timeout=settings.redis_socket_timeout_seconds,
        socket_timeout=settings.redis_socket_timeout_seconds,
        health_check_interval=REDIS_HEALTH_CHECK_S,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )
    return Redis.from_pool(pool)  # from_pool: closing the client closes the pool


class GatewayApp:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.redis = _redis(settings)
        self.channel = grpc.aio.insecure_channel(settings.scheduler_address, options=GRPC_OPTIONS)
        self.tiers = settings.tier_table()
        self.drain = Drain()
        self.api = JobsApi(
            scheduler_service_pb2_grpc.SchedulerServiceStub(self.channel),
            settings.catalog(),
            self.tiers,
            timeout_s=settings.scheduler_timeout_seconds,
            drain=self.drain,
        )
        self.authenticate = Authenticator(ApiKeys(self.redis))
        self.grpc_port = 0
        self.http_port = 0
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        http_logging.install()
        servicer = JobServiceServicer(self.api, self.authenticate, self.quota_headers, self.drain)
        self._server, self.grpc_port, self._health = await start_grpc(
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
            drain=self.drain,
        )
        # What the drain leaves running past the grace is cancelled at once.
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
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

    async def stop(self, grace: float | None = None) -> None:
        """Drains, then closes. Health turns NOT_SERVING; new calls get UNAVAILABLE (gRPC) or 503
        (REST), both SHUTTING_DOWN, from servers that keep listening to say so; watch streams end
        with UNAVAILABLE; calls in flight get up to `grace` seconds (default: the setting). Then
        both servers close, cutting whatever is left (health watches, calls past the grace)."""
        grace_s = self.settings.shutdown_grace_seconds if grace is None else grace
        log.info("draining: calls in flight have %g s to finish", grace_s)
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        self.drain.begin()
        if not await self.drain.settled(grace_s):
            log.warning("calls still in flight after the %g s grace are cut off", grace_s)
        if self._server is not None:
            await self._server.stop(0)
        if self._runner is not None:
            await self._runner.cleanup()
        await self.channel.close()
        await self.redis.aclose()


async def main() -> None:
    settings = GatewaySettings()
    await serve("gateway", settings, GatewayApp(settings))


if __name__ == "__main__":
    asyncio.run(main())
