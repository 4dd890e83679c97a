"""API keys: `kiln_<key id>_<secret>`. Redis keeps only the secret's SHA-256, never the key."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from redis.asyncio import Redis

from libs import redis_keys as keys
from libs.errors import InvalidArgument

_KEY = re.compile(r"kiln_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
_TENANT = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
DEFAULT_TIER = "free"


@dataclass(frozen=True)
class Principal:
    key_id: str
    tenant: str
    tier: str


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    tenant: str
    tier: str
    created_ms: int


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _check_tier(tier: str) -> None:
    # Which tiers exist is the services' configuration; a key only needs a well-formed name.
    if not _TENANT.fullmatch(tier):
        raise InvalidArgument.field(
            "tier", "must be a tier name (a-z, 0-9, '-'): free, pro, enterprise or a configured one"
        )


class ApiKeys:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def create(self, tenant: str, tier: str = DEFAULT_TIER) -> str:
        """Stores a new key for `tenant` and returns it; this is the only time it is visible."""
        if not _TENANT.fullmatch(tenant):
            raise InvalidArgument.field(
                "tenant", "must be 1-63 characters of a-z, 0-9 and '-', starting with a letter or digit"
            )
        _check_tier(tier)
        key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        await self._redis.hset(
            keys.api_key(key_id),
            mapping={
                "tenant": tenant,
                "tier": tier,
                "secret_sha256": _digest(secret),
                "created_ms": int(time.time() * 1000),
            },
        )
        await self._redis.sadd(keys.api_key_index(), key_id)
        return f"kiln_{key_id}_{secret}"

    async def set_tier(self, key_id: str, tier: str) -> bool:
        """Moves a key to another tier; the gateway reads it on every call, so it applies at once."""
        _check_tier(tier)
        key = keys.api_key(key_id)
        if not await self._redis.exists(key):
            return False
        await self._redis.hset(key, "tier", tier)
        return True

    async def revoke(self, key_id: str) -> bool:
        removed = await self._redis.delete(keys.api_key(key_id))
        await self._redis.srem(keys.api_key_index(), key_id)
        return bool(removed)

    async def list_keys(self) -> list[KeyInfo]:
        found = []
        members: set[bytes] = await self._redis.smembers(keys.api_key_index())  # type: ignore[assignment]
        for raw_id in sorted(members):
            key_id = raw_id.decode()
            fields: dict[bytes, bytes] = await self._redis.hgetall(keys.api_key(key_id))  # type: ignore[assignment]
            if fields:
                found.append(
                    KeyInfo(
                        key_id,
                        fields[b"tenant"].decode(),
                        fields[b"tier"].decode(),
                        int(fields[b"created_ms"]),
                    )
                )
        return found

    async def lookup(self, api_key: str) -> Principal | None:
        match = _KEY.fullmatch(api_key)
        if match is None:
            return None
        key_id, secret = match.groups()
        fields: dict[bytes, bytes] = await self._redis.hgetall(keys.api_key(key_id))  # type: ignore[assignment]
        if not fields or not hmac.compare_digest(fields[b"secret_sha256"].decode(), _digest(secret)):
            return None
        return Principal(key_id, fields[b"tenant"].decode(), fields[b"tier"].decode())
