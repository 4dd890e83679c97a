"""Wires the scheduler together: Redis, the job store, queues, the hub and its gRPC services."""

from __future__ import annotations

import asyncio
import logging

import grpc
from kiln.scheduler.v1 import scheduler_service_pb2, scheduler_service_pb2_grpc
from kiln.worker.v1 import worker_service_pb2, worker_service_pb2_grpc
from redis.asyncio import Redis

from libs.serving import serve, start_grpc
from libs.settings import SchedulerSettings
from services.scheduler.api import SchedulerApi
from services.scheduler.expiry import INTENT as EXPIRE_INTENT
from services.scheduler.expiry import QueueExpiry
from services.scheduler.housekeeping import Housekeeping
from services.scheduler.hub import Hub
from services.scheduler.jobs import Jobs
from services.scheduler.model_health import INTENT as LOAD_FAILED_INTENT
from services.scheduler.model_health import ModelHealth
from services.scheduler.queues import Queues
from services.scheduler.reaper import Reaper
from services.scheduler.recovery import Recovery
from services.scheduler.registry import Registry
from services.scheduler.retries import RetryPolicy
from services.scheduler.scripts import Scripts
from services.scheduler.store import JobStore
from services.scheduler.worker_service import WorkerService

log = logging.getLogger(__name__)


class SchedulerApp:
    def __init__(self, settings: SchedulerSettings) -> None:
        self.settings = settings
        # A connection idle for a second is pinged before use, so the first command after a Redis
        # restart reconnects instead of failing on a dead socket.
        self.redis = Redis.from_url(
            settings.redis_url,
            max_connections=1000,
            socket_timeout=settings.redis_socket_timeout_seconds,
            health_check_interval=1,
        )
        scripts = Scripts(self.redis)
        self.store = JobStore(
            self.redis,
            scripts,
            job_ttl_s=settings.job_ttl_seconds,
            artifact_ttl_s=settings.artifact_ttl_seconds,
        )
        tiers = settings.tier_table()
        self.queues = Queues(self.redis, scripts, {name: t.dispatch_weight for name, t in tiers.items()})
        self.hub = Hub(self.redis)
        # Blocking reads must return well inside the socket timeout, or they fail as timeouts.
        watch_block_ms = max(100, int(settings.redis_socket_timeout_seconds * 500))
        self.jobs = Jobs(
            self.store,
            self.queues,
            self.hub,
            watch_block_ms=watch_block_ms,
            tiers=tiers,
            catalog=settings.catalog(),
        )
        self.registry = Registry(self.redis, stale_ms=3 * settings.heartbeat_interval_ms)
        self.policy = RetryPolicy(
            settings.retry_max_attempts,
            max_total_attempts=settings.retry_max_total_attempts,
            backoff_base_ms=int(settings.retry_backoff_base_seconds * 1000),
            backoff_max_ms=int(settings.retry_backoff_max_seconds * 1000),
        )
        self.recovery = Recovery(self.store, self.queues, self.policy, self.registry)
        self.workers = WorkerService(
            self.store, self.queues, self.hub, self.recovery, self.registry, settings
        )
        grace_ms = int(settings.recovery_grace_seconds * 1000)
        self.expiry = QueueExpiry(self.queues, self.store, grace_ms=grace_ms)
        self.model_health = ModelHealth(
            self.queues, self.store, self.registry, sorted(settings.catalog()), grace_ms=grace_ms
        )
        self.reaper = Reaper(
            self.store,
            self.queues,
            self.recovery,
            grace_ms=grace_ms,
            handlers={EXPIRE_INTENT: self.expiry.end, LOAD_FAILED_INTENT: self.model_health.end},
        )
        self.housekeeping = Housekeeping(
            {
                "backoffs": lambda: self.queues.promote_due(100),
                "queue timeouts": self.expiry.expire_due,
                "leases": self.reaper.reap_leases,
                "intents": self.reaper.finish_intents,
                "models": self.model_health.check,
            },
            settings.housekeeping_interval_seconds,
        )
        self._housekeeping_task: asyncio.Task[None] | None = None
        self.port = 0
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        await self.hub.start()
        self._housekeeping_task = asyncio.create_task(self.housekeeping.run_forever(), name="housekeeping")
        api = SchedulerApi(self.jobs)
        self._server, self.port, _ = await start_grpc(
            self.settings.scheduler_host,
            self.settings.scheduler_port,
            [
                lambda s: scheduler_service_pb2_grpc.add_SchedulerServiceServicer_to_server(api, s),
                lambda s: worker_service_pb2_grpc.add_WorkerServiceServicer_to_server(self.workers, s),
            ],
            [
                scheduler_service_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name,
                worker_service_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name,
            ],
        )

    def ready_info(self) -> dict[str, int]:
        return {"grpc": self.port}

    async def stop(self) -> None:
        """Drains: no worker gets new work, calls in flight get the grace period to finish, then the
        jobs still on this replica's workers are handed back to run elsewhere. Each phase is bounded,
        so a stuck one cannot keep the process from exiting."""
        grace = self.settings.shutdown_grace_seconds
        self.workers.stop_dispatch()
        if self._server is not None:
            await self._server.stop(grace)
        for phase, finish in (
            ("hand back the workers' jobs", self.workers.drain()),
            ("stop housekeeping", self._cancel_housekeeping()),
            ("stop pub/sub", self.hub.stop()),
        ):
            try:
                await asyncio.wait_for(finish, timeout=grace + 5)
            except TimeoutError:
                log.error("shutdown: could not %s in time; going on", phase)
        await self.redis.aclose()

    async def _cancel_housekeeping(self) -> None:
        if self._housekeeping_task is not None:
            self._housekeeping_task.cancel()
            await asyncio.gather(self._housekeeping_task, return_exceptions=True)


async def main() -> None:
    settings = SchedulerSettings()
    await serve("scheduler", settings, SchedulerApp(settings))


if __name__ == "__main__":
    asyncio.run(main())
