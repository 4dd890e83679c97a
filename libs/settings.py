"""Typed settings, read once at start-up and passed in.

Sources, highest first: constructor arguments, `KILN_*` environment variables, then the TOML file
named by `KILN_CONFIG` (if any). Keys are flat (`gateway_http_port`, env `KILN_GATEWAY_HTTP_PORT`);
extra models go in `[models.NAME]` tables.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from libs.catalog import ModelSpec, build_catalog
from libs.tiers import Tier, build_tiers
from services.gpu_worker.faults import FaultRule


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KILN_", extra="ignore", frozen=True)

    redis_url: str = "redis://127.0.0.1:6379/0"
    # A Redis reply slower than this is an error; blocking reads wait at most half of it.
    redis_socket_timeout_seconds: float = 10.0
    log_level: str = "INFO"
    # "none", "console", or "otlp" (configured by the standard OTEL_EXPORTER_OTLP_* variables).
    otel_exporter: str = "none"
    models: dict[str, ModelSpec] = Field(default_factory=dict)
    # [tiers.NAME] tables: overrides of the default tiers' fields, or new tiers.
    tiers: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("KILN_CONFIG")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    def catalog(self) -> dict[str, ModelSpec]:
        return build_catalog(self.models)

    def tier_table(self) -> dict[str, Tier]:
        return build_tiers(self.tiers)


class GatewaySettings(CommonSettings):
    gateway_host: str = "127.0.0.1"
    gateway_grpc_port: int = 50051
    gateway_http_port: int = 8080
    scheduler_address: str = "127.0.0.1:50052"
    # Unary calls to the scheduler that take longer fail as UNAVAILABLE (retryable).
    scheduler_timeout_seconds: float = 10.0
    max_body_bytes: int = 1 << 20
    # On SIGTERM: how long calls in flight may take to finish before they are cut off.
    shutdown_grace_seconds: float = 10.0


class SchedulerSettings(CommonSettings):
    scheduler_host: str = "127.0.0.1"
    scheduler_port: int = 50052
    lease_seconds: float = 30.0
    heartbeat_interval_ms: int = 5000
    artifact_ttl_seconds: int = 24 * 3600
    job_ttl_seconds: int = 7 * 24 * 3600
    # How long a dispatcher sleeps between checks when no wake-up arrives (a missed pub/sub hint).
    dispatch_poll_seconds: float = 0.5
    # How often each replica runs its housekeeping: queue timeouts, ended backoffs, expired leases,
    # unfinished intents, models no worker can load.
    housekeeping_interval_seconds: float = 0.25
    # A job's run (not its wait for a slot) is stopped after this long: DEADLINE_EXCEEDED.
    execution_timeout_seconds: float = 600.0
    # Attempts per failure reason (ErrorInfo.reason of the worker's failure), over the defaults
    # WORKER_CRASHED 3, OUT_OF_MEMORY 3, INVALID_OUTPUT 2, MODEL_LOAD_FAILED 3, DEADLINE_EXCEEDED 1;
    # other reasons are not retried.
    retry_max_attempts: dict[str, Annotated[int, Field(ge=1)]] = Field(default_factory=dict)
    # Hand-overs to workers of any kind, so a job that keeps taking its worker down ends.
    retry_max_total_attempts: int = Field(default=10, ge=1)
    retry_backoff_base_seconds: float = Field(default=1.0, ge=0)
    retry_backoff_max_seconds: float = Field(default=60.0, ge=0)
    # How long a half-done change (an expired lease being requeued, a queue timeout or a dead-letter
    # requeue cut short) is left to its owner before another replica finishes it. (An unfinished
    # CreateJob gets a fixed 30 s, longer than any call is waited for.)
    recovery_grace_seconds: float = Field(default=10.0, gt=0)
    # On SIGTERM: how long in-flight calls and worker streams get to finish.
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)


class WorkerSettings(CommonSettings):
    scheduler_address: str = "127.0.0.1:50052"
    worker_id: str = ""
    worker_models: list[str] = Field(default_factory=lambda: ["tiny-sd"])
    worker_slots: int = 1
    # "auto" picks cuda when present, else cpu.
    worker_device: str = "auto"
    reconnect_seconds: float = 1.0
    # Jobs held beyond `worker_slots`, ready to start the moment a slot frees up.
    worker_prefetch: int = Field(default=1, ge=0)
    # On SIGTERM, how long running jobs get to finish before they are stopped and requeued.
    worker_drain_seconds: float = 30.0
    # The hardware-edge fake of the GPU's memory readings; used when either is > 0.
    fake_vram_total_bytes: int = 0
    fake_vram_free_bytes: int = 0
    # Injected GPU faults, for tests only (env KILN_FAULTS, a JSON list); see services/gpu_worker/faults.py.
    faults: list[FaultRule] = Field(default_factory=list)


def dump(settings: BaseSettings) -> dict[str, Any]:
    return settings.model_dump(mode="json")
