"""Shared start-up pieces: a gRPC server with health and reflection, logging, readiness, and the
shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Iterable
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from libs.settings import CommonSettings
from libs.telemetry import setup_tracing

# Servers accept messages up to this size; artifacts travel in 1 MiB chunks well below it.
MAX_MESSAGE_BYTES = 8 << 20
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # A channel whose server went away retries the connection with a backoff that would grow to
    # two minutes; capped, a restarted scheduler is found again within a few seconds.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]
log = logging.getLogger(__name__)


async def start_grpc(
    host: str, port: int, register: Iterable[Callable[[grpc.aio.Server], None]], service_names: Iterable[str]
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Starts a server with the given services plus grpc.health.v1 and reflection; returns its port."""
    server = grpc.aio.server(options=GRPC_OPTIONS)
    for add in register:
        add(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def announce(service: str, **ports: int) -> None:
    """One line on stdout that launchers wait for; it carries the ports actually bound."""
    print(f"KILN_READY {service} " + " ".join(f"{k}={v}" for k, v in ports.items()), flush=True)


async def wait_for_shutdown() -> None:
    """Returns at the first SIGTERM or SIGINT. The handlers go with it: a second signal during the
    drain that follows stops the process at once."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None:
        """Stops taking new work, lets what is in flight finish within the service's own grace
        period (from its settings), then releases everything."""
        ...

    def ready_info(self) -> dict[str, int]:
        """What `announce` prints once started: the ports bound, or the worker's slots."""
        ...


async def serve(name: str, settings: CommonSettings, app: Service) -> None:
    """A service's whole life as a process: start, announce, run until SIGTERM/SIGINT, then drain
    and stop (`app.stop()`); a second signal during the drain ends the process at once."""
    configure_logging(settings.log_level)
    setup_tracing(f"kiln-{name.replace('_', '-')}", settings.otel_exporter)
    await app.start()
    announce(name, **app.ready_info())
    try:
        await wait_for_shutdown()
        log.info("%s: shutting down", name)
    finally:
        await app.stop()
    log.info("%s: stopped", name)
