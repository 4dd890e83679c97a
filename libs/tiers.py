"""Subscription tiers: what each tier may spend, queue and ask for.

Defaults ship for `free`, `pro` and `enterprise`; `[tiers.NAME]` tables in the config file override
them field by field or add tiers. Rates are in compute units (see `libs.cost`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from libs.errors import FailedPrecondition


class Tier(BaseModel):
    # Strict: "20" or true are not numbers here, and nor are inf and nan; rates have a floor so
    # that one unit's interval stays a finite number of milliseconds.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    cu_per_second: float = Field(ge=1e-6, le=1e6, description="sustained compute-unit rate")
    cu_burst: int = Field(ge=1, description="compute units that may be spent at once")
    daily_cu_quota: int = Field(ge=1, description="compute units per rolling day")
    requests_per_second: float = Field(
        ge=1e-6, le=1e6, description="sustained CreateJob rate, whatever the cost"
    )
    request_burst: int = Field(ge=1)
    max_in_flight: int = Field(ge=1, description="jobs queued or running at once")
    max_queued_cu: int = Field(ge=1, description="compute units waiting in the queue at once")
    max_pixels: int = Field(ge=1, description="largest width x height")
    max_steps: int = Field(ge=1)
    max_num_images: int = Field(ge=1)
    dispatch_weight: int = Field(ge=1, description="share of GPU time against other tiers")
    max_queue_wait_s: float = Field(ge=1, le=7 * 86400, description="longest a job may wait in the queue")


DEFAULT_TIERS: dict[str, Tier] = {
    "free": Tier(
        cu_per_second=0.2,
        cu_burst=20,
        daily_cu_quota=500,
        requests_per_second=1,
        request_burst=10,
        max_in_flight=10,
        max_queued_cu=40,
        max_pixels=768 * 768,
        max_steps=50,
        max_num_images=2,
        dispatch_weight=1,
        max_queue_wait_s=600,
    ),
    "pro": Tier(
        cu_per_second=2,
        cu_burst=200,
        daily_cu_quota=20_000,
        requests_per_second=10,
        request_burst=50,
        max_in_flight=100,
        max_queued_cu=1_000,
        max_pixels=1024 * 1024,
        max_steps=100,
        max_num_images=4,
        dispatch_weight=4,
        max_queue_wait_s=1_800,
    ),
    "enterprise": Tier(
        cu_per_second=20,
        cu_burst=2_000,
        daily_cu_quota=1_000_000,
        requests_per_second=100,
        request_burst=500,
        max_in_flight=1_000,
        max_queued_cu=20_000,
        max_pixels=2048 * 2048,
        max_steps=150,
        max_num_images=4,
        dispatch_weight=16,
        max_queue_wait_s=3_600,
    ),
}


def build_tiers(configured: dict[str, dict[str, object]]) -> dict[str, Tier]:
    """Defaults overlaid with the config file's tables; a table may set only some fields."""
    tiers = dict(DEFAULT_TIERS)
    for name, fields in configured.items():
        base = tiers.get(name)
        merged = {**(base.model_dump() if base else {}), **fields}
        tiers[name] = Tier.model_validate(merged)
    return tiers


def tier_of(tiers: dict[str, Tier], name: str) -> Tier:
    tier = tiers.get(name)
    if tier is None:
        raise FailedPrecondition(
            f"the API key's tier {name!r} is not configured", reason="TIER_UNKNOWN", metadata={"tier": name}
        )
    return tier
