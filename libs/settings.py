"""Typed settings, read once at start-up and passed in.

Sources, highest first: constructor arguments, `KILN_*` environment variables, then the TOML file
named by `KILN_CONFIG` (if any). Keys are flat (`gateway_http_port`, env `KILN_GATEWAY_HTTP_PORT`);
extra models go in `[models.NAME]` tables.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from libs.catalog import ModelSpec, build_catalog
from libs.tiers import Tier, build_tiers


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


class SchedulerSettings(CommonSettings):
    scheduler_host: str = "127.0.0.1"
    scheduler_port: int = 50052
    lease_seconds: float = 30.0
    heartbeat_interval_ms: int = 5000
    artifact_ttl_seconds: int = 24 * 3600
    job_ttl_seconds: int = 7 * 24 * 3600
    # How long a dispatcher sleeps between checks when no wake-up arrives (a missed pub/sub hint).
    dispatch_poll_seconds: float = 0.5
    # How often each replica looks for queued jobs past their queue timeout.
    queue_expiry_interval_seconds: float = 0.25


class WorkerSettings(CommonSettings):
    scheduler_address: str = "127.0.0.1:50052"
    worker_id: str = ""
    worker_models: list[str] = Field(default_factory=lambda: ["tiny-sd"])
    worker_slots: int = 1
    # "auto" picks cuda when present, else cpu.
    worker_device: str = "auto"
    reconnect_seconds: float = 1.0


def dump(settings: BaseSettings) -> dict[str, Any]:
    return settings.model_dump(mode="json")
