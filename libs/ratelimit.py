"""The per-tenant rate policies (GCRA) and how their state reads as RateLimit headers.

The scheduler's create script enforces the policies; this module names them (shared by the
scheduler and the gateway) and reads their state for the IETF `RateLimit-Policy` / `RateLimit`
fields (draft-ietf-httpapi-ratelimit-headers), which REST responses carry as headers and gRPC
responses as metadata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from redis.asyncio import Redis

from libs import redis_keys as keys
from libs.tiers import Tier

DAY_MS = 86_400_000
# The policies that charge a job's compute units, and so are refunded when it never ran.
CU_POLICIES = ("cu", "daily_cu")


@dataclass(frozen=True)
class Policy:
    name: str
    interval_ms: float  # one unit's worth of time: 1000 / rate
    burst: int
    units: int  # what this request charges

    def args(self) -> list[str]:
        return [self.name, repr(self.interval_ms), str(self.burst), str(self.units)]


def tier_policies(tier: Tier, cost: int) -> tuple[Policy, ...]:
    return (
        Policy("cu", 1000 / tier.cu_per_second, tier.cu_burst, cost),
        Policy("daily_cu", DAY_MS / tier.daily_cu_quota, tier.daily_cu_quota, cost),
        Policy("requests", 1000 / tier.requests_per_second, tier.request_burst, 1),
    )


@dataclass(frozen=True)
class PolicyStatus:
    name: str
    quota: int
    window_s: int  # time to refill the whole quota from empty
    remaining: int
    reset_s: int  # until the quota is whole again


async def read_status(redis: Redis, tenant: str, tier: Tier) -> list[PolicyStatus]:
    """The policies' state now, by Redis's clock, in one round trip."""
    policies = tier_policies(tier, 1)
    pipe = redis.pipeline(transaction=False)
    pipe.time()
    for policy in policies:
        pipe.get(keys.rate_policy(tenant, policy.name))
    (seconds, micros), *states = await pipe.execute()
    now = seconds * 1000 + micros / 1000
    statuses = []
    for policy, raw in zip(policies, states, strict=True):
        in_use = 0.0  # units of the burst in use now ("<units>:<ms>", draining one per interval)
        if raw:
            units, at = raw.decode().split(":")
            in_use = max(0.0, float(units) - (now - float(at)) / policy.interval_ms)
        statuses.append(
            PolicyStatus(
                name=policy.name,
                quota=policy.burst,
                window_s=math.ceil(policy.burst * policy.interval_ms / 1000),
                remaining=max(0, math.floor(policy.burst - in_use)),
                reset_s=math.ceil(in_use * policy.interval_ms / 1000),
            )
        )
    return statuses


def header_fields(statuses: list[PolicyStatus]) -> dict[str, str]:
    return {
        "RateLimit-Policy": ", ".join(f'"{s.name}";q={s.quota};w={s.window_s}' for s in statuses),
        "RateLimit": ", ".join(f'"{s.name}";r={s.remaining};t={s.reset_s}' for s in statuses),
    }
