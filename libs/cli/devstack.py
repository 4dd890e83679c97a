"""`kiln up` (`make run`): Redis, the scheduler, one tiny-sd worker and the gateway, on this machine.

Without KILN_REDIS_URL it starts a private redis-server with AOF under `.kiln/`. It creates a
development API key and prints it with examples, then runs until Ctrl-C. The benchmarks start the
same stack through `LocalStack`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from redis.asyncio import Redis

from libs.api_keys import ApiKeys
from libs.redis_server import RedisServer

STATE_DIR = Path(".kiln")
REDIS_URL_FILE = STATE_DIR / "redis.url"
SERVICES = ("services.scheduler", "services.gpu_worker", "services.gateway")


@dataclass
class LocalStack:
    http_port: int
    grpc_port: int
    scheduler_port: int
    state_dir: Path = STATE_DIR
    api_key: str = ""
    redis_url: str = ""
    procs: list[asyncio.subprocess.Process] = field(default_factory=list)
    _redis_server: RedisServer | None = None

    async def start(self) -> None:
        self.state_dir.mkdir(exist_ok=True)
        self.redis_url = os.environ.get("KILN_REDIS_URL", "")
        if not self.redis_url:
            self._redis_server = RedisServer((self.state_dir / "redis").resolve(), appendonly=True)
            self._redis_server.start()
            self.redis_url = self._redis_server.url
        (self.state_dir / "redis.url").write_text(self.redis_url)
        env = {
            **os.environ,
            "KILN_REDIS_URL": self.redis_url,
            "KILN_SCHEDULER_PORT": str(self.scheduler_port),
            "KILN_SCHEDULER_ADDRESS": f"127.0.0.1:{self.scheduler_port}",
            "KILN_GATEWAY_HTTP_PORT": str(self.http_port),
            "KILN_GATEWAY_GRPC_PORT": str(self.grpc_port),
        }
        for module in SERVICES:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", module, env=env, stdout=asyncio.subprocess.PIPE
            )
            self.procs.append(proc)
            print(await _ready_line(module, proc), file=sys.stderr)
        self.api_key = await self._dev_key()

    async def _dev_key(self) -> str:
        """The key from the last run while it is still valid, so exported keys keep working."""
        saved = self.state_dir / "dev-api-key"
        redis = Redis.from_url(self.redis_url)
        try:
            keys = ApiKeys(redis)
            if saved.exists():
                key = saved.read_text().strip()
                if await keys.lookup(key) is not None:
                    return key
            key = await keys.create("dev", "enterprise")
            saved.write_text(key)
            saved.chmod(0o600)
            return key
        finally:
            await redis.aclose()

    async def wait(self) -> None:
        """Returns on Ctrl-C / SIGTERM, or when any service exits on its own."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        waiters = [asyncio.create_task(p.wait()) for p in self.procs]
        waiters.append(asyncio.create_task(stop.wait()))
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()

    async def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.returncode is None:
                proc.terminate()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), timeout=10)
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        if self._redis_server is not None:
            self._redis_server.stop()


async def _ready_line(module: str, proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=120)).decode()
        if not line:
            raise SystemExit(f"{module} exited with {await proc.wait()} before it was ready")
        if line.startswith("KILN_READY"):
            return line.strip()


async def start_service(
    module: str, env: dict[str, str], *, stderr: int | IO[bytes] | None = None
) -> tuple[asyncio.subprocess.Process, dict[str, int]]:
    """Starts `python -m module` and waits for its KILN_READY line; returns it and what it bound."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, env=env, stdout=asyncio.subprocess.PIPE, stderr=stderr
    )
    line = await _ready_line(module, proc)
    ports = {k: int(v) for k, v in (item.split("=") for item in line.split()[2:])}
    return proc, ports


def _banner(key: str, http_port: int, grpc_port: int) -> str:
    return f"""
Kiln is running.
  REST  http://127.0.0.1:{http_port}   (OpenAPI: /openapi.json)
  gRPC  127.0.0.1:{grpc_port}          (kiln.v1.JobService, reflection on)

Development API key (tenant "dev"):
  export KILN_API_KEY={key}

Try it:
  curl -s -X POST http://127.0.0.1:{http_port}/v1/jobs -H "Authorization: Bearer $KILN_API_KEY" \\
       -H 'Content-Type: application/json' \\
       -d '{{"model": "tiny-sd", "textToImage": {{"prompt": "a red fox", "seed": "7"}}}}'
  .venv/bin/kiln generate "a red fox" -o fox.png --server 127.0.0.1:{grpc_port}

Ctrl-C stops everything.
"""


async def run_stack(http_port: int = 8080, grpc_port: int = 50051, scheduler_port: int = 50052) -> None:
    stack = LocalStack(http_port, grpc_port, scheduler_port)
    try:
        await stack.start()
        print(_banner(stack.api_key, http_port, grpc_port), flush=True)
        await stack.wait()
    finally:
        await stack.stop()
