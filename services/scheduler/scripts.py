"""Loads the Lua scripts that make each multi-key change atomic."""

from __future__ import annotations

from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript


class Scripts:
    def __init__(self, redis: Redis) -> None:
        lua = resources.files("services.scheduler") / "lua"

        def load(name: str) -> AsyncScript:
            return redis.register_script((lua / f"{name}.lua").read_text())

        self.create_job = load("create_job")
        self.transition = load("transition")
        self.dispatch = load("dispatch")
        self.release = load("release")
        self.renew = load("renew")
