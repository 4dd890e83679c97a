"""Admission: what a job costs its tenant, and the terms the create script enforces atomically.

Three GCRA policies per tenant, all checked before any is spent: compute units per second (with a
burst), compute units per rolling day, and CreateJob requests per second. Two caps: jobs in
flight, and compute units waiting in the queue. Time is Redis's, inside the script.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from libs.errors import InvalidArgument, KilnError, QuotaViolation, ResourceExhausted, Unavailable
from libs.ratelimit import Policy, tier_policies
from libs.tiers import Tier


@dataclass(frozen=True)
class Terms:
    tier: str
    cost: int
    max_in_flight: int
    max_queued_cu: int
    policies: tuple[Policy, ...]


def terms(tier_name: str, tier: Tier, cost: int) -> Terms:
    """Refuses outright (400, never 429) a cost that no amount of waiting would admit."""
    for limit, what in (
        (tier.cu_burst, "cu_burst"),
        (tier.daily_cu_quota, "daily_cu_quota"),
        (tier.max_queued_cu, "max_queued_cu"),
    ):
        if cost > limit:
            raise InvalidArgument(
                f"job: costs {cost} compute units, more than the {tier_name} tier's {what} of {limit}, "
                "so it can never be admitted; ask for fewer pixels, steps or images",
                reason="COST_EXCEEDS_TIER",
                metadata={"cost": str(cost), "limit": str(limit), "policy": what, "tier": tier_name},
            )
    return Terms(
        tier=tier_name,
        cost=cost,
        max_in_flight=tier.max_in_flight,
        max_queued_cu=tier.max_queued_cu,
        policies=tier_policies(tier, cost),
    )


def refusal(tenant: str, terms: Terms, status: str, policy: str, retry_ms: int, limit: str) -> KilnError:
    """The error for a refusal the create script reported; nothing was written or spent."""
    retry_s = max(retry_ms, 1) / 1000
    metadata = {"policy": policy, "tier": terms.tier, "limit": limit}
    if status == "QUEUE_FULL":
        return Unavailable(
            f"the {terms.tier} tier's queue holds at most {limit} compute units for a tenant; retry later",
            reason="QUEUE_FULL",
            metadata=metadata,
            retry_after_s=retry_s,
        )
    reason = "TOO_MANY_IN_FLIGHT" if status == "IN_FLIGHT" else "RATE_LIMITED"
    return ResourceExhausted(
        f"over the {terms.tier} tier's {policy} limit (a burst of {limit}); retry in {math.ceil(retry_s)} s",
        reason=reason,
        metadata=metadata,
        retry_after_s=retry_s,
        quota_violations=[QuotaViolation(f"tenant:{tenant}", f"{policy}: limit {limit} ({terms.tier} tier)")],
    )
