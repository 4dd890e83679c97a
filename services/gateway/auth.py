"""Turns an `authorization` value (REST header or gRPC metadata) into the calling principal."""

from __future__ import annotations

from libs.api_keys import ApiKeys, Principal
from libs.errors import Unauthenticated


class Authenticator:
    def __init__(self, keys: ApiKeys) -> None:
        self._keys = keys

    async def __call__(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthenticated(
                "missing API key: send 'Authorization: Bearer <key>'", reason="API_KEY_MISSING"
            )
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(
                "malformed authorization: expected 'Bearer <key>'", reason="API_KEY_MALFORMED"
            )
        principal = await self._keys.lookup(token.strip())
        if principal is None:
            raise Unauthenticated("API key not valid", reason="API_KEY_INVALID")
        return principal
