"""Shared fixtures: a private Redis server, and the whole suite running in this process on port 0."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.asyncio import Redis

from libs.api_keys import ApiKeys
from libs.catalog import ModelSpec
from libs.redis_server import RedisServer
from libs.settings import GatewaySettings, SchedulerSettings, WorkerSettings
from services.gateway.app import GatewayApp
from services.gpu_worker.app import WorkerApp
from services.scheduler.app import SchedulerApp


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), appendonly=False)
    server.start()
    yield server
    server.stop()


def _tier(**fields: float) -> dict[str, float]:
    """A tier roomy in everything but what a test sets."""
    roomy = {
        "cu_per_second": 1000,
        "cu_burst": 1000,
        "daily_cu_quota": 100_000,
        "requests_per_second": 1000,
        "request_burst": 1000,
        "max_in_flight": 1000,
        "max_queued_cu": 10_000,
        "max_pixels": 1024 * 1024,
        "max_steps": 150,
        "max_num_images": 4,
        "dispatch_weight": 1,
        "max_queue_wait_s": 600,
    }
    return {**roomy, **fields}


# Tiers the admission tests use, on top of the shipped free/pro/enterprise.
TEST_TIERS: dict[str, dict[str, float]] = {
    "burst5": _tier(cu_burst=5, cu_per_second=0.01),
    "burst100": _tier(cu_burst=100, cu_per_second=1),
    "daily3": _tier(daily_cu_quota=3),
    "retry2s": _tier(cu_burst=1, cu_per_second=0.5),
    "qcap10": _tier(max_queued_cu=10),
    # Drains slowly enough that a refund shows to three decimals.
    "slow-drain": _tier(cu_burst=5, cu_per_second=0.01, daily_cu_quota=100, requests_per_second=0.01),
    "two-policies": _tier(cu_burst=1, cu_per_second=1, request_burst=1, requests_per_second=0.1),
}


@pytest.fixture(scope="session")
def local_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-sd saved as an ordinary diffusers directory, so `from_pretrained` is exercised."""
    from services.gpu_worker.tiny_sd import build_tiny_sd

    path = tmp_path_factory.mktemp("models") / "local-tiny"
    build_tiny_sd().save_pretrained(path)
    return path


@dataclass
class Stack:
    redis_url: str
    grpc_target: str
    http_base: str
    key_a: str
    key_b: str
    scheduler: SchedulerApp
    worker: WorkerApp
    gateway: GatewayApp


@pytest.fixture(scope="session")
async def stack(redis_server: RedisServer, local_model_dir: Path) -> AsyncIterator[Stack]:
    url = redis_server.url
    models = {
        "local-tiny": ModelSpec(
            source=str(local_model_dir), size_multiple=16, default_size=64, default_steps=4
        ),
        # In the gateway's catalog but loaded by no worker: its jobs wait in the queue.
        "unserved": ModelSpec(source="/nonexistent", size_multiple=16, default_size=64, default_steps=4),
        # Served only by the one-slot worker the queue-timeout test starts for itself.
        "solo": ModelSpec(source=str(local_model_dir), size_multiple=16, default_size=64, default_steps=4),
        # Also unserved; the admission-control test meters its service rate by claiming by hand.
        "metered": ModelSpec(source="/nonexistent", size_multiple=16, default_size=64, default_steps=4),
    }
    # A short socket timeout, so tests that wait longer than it show blocking reads survive it.
    scheduler = SchedulerApp(
        SchedulerSettings(
            redis_url=url,
            scheduler_port=0,
            dispatch_poll_seconds=0.2,
            redis_socket_timeout_seconds=1.0,
            models=models,
            tiers=TEST_TIERS,
            shutdown_grace_seconds=1.0,
        )
    )
    await scheduler.start()
    address = f"127.0.0.1:{scheduler.port}"
    worker = WorkerApp(
        WorkerSettings(
            redis_url=url,
            scheduler_address=address,
            worker_slots=2,
            worker_id="test-worker",
            models=models,
            worker_models=["tiny-sd", "local-tiny"],
        )
    )
    await worker.start()
    assert worker.link is not None
    gateway = GatewayApp(
        GatewaySettings(
            redis_url=url,
            scheduler_address=address,
            gateway_grpc_port=0,
            gateway_http_port=0,
            models=models,
            tiers=TEST_TIERS,
        )
    )
    await gateway.start()
    redis = Redis.from_url(url)
    keys = ApiKeys(redis)
    # The big tier, so the suite's own pace of submits never meets a rate limit.
    key_a, key_b = await keys.create("tenant-a", "enterprise"), await keys.create("tenant-b", "enterprise")
    await redis.aclose()
    await asyncio.wait_for(worker.link.connected.wait(), timeout=30)
    yield Stack(
        url,
        f"127.0.0.1:{gateway.grpc_port}",
        f"http://127.0.0.1:{gateway.http_port}",
        key_a,
        key_b,
        scheduler,
        worker,
        gateway,
    )
    await gateway.stop(1)
    await worker.stop()
    await scheduler.stop()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
