"""`kiln up` (`make run`): Redis, the scheduler, one tiny-sd worker and the gateway, on this machine.

Without KILN_REDIS_URL it starts a private redis-server with AOF under `.kiln/`. It creates a
development API key and prints it with examples, then runs until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

from redis.asyncio import Redis

from libs.api_keys import ApiKeys
from libs.redis_server import RedisServer

STATE_DIR = Path(".kiln")
REDIS_URL_FILE = STATE_DIR / "redis.url"


async def _start(module: str, env: dict[str, str]) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, env=env, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=120)).decode()
        if not line:
            raise SystemExit(f"{module} exited with {await proc.wait()} before it was ready")
        if line.startswith("KILN_READY"):
            return proc, line.strip()


def _banner(key: str, http_port: str, grpc_port: str) -> str:
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
  .venv/bin/kiln generate "a red fox" -o fox.png

Ctrl-C stops everything.
"""


async def run_stack(http_port: int = 8080, grpc_port: int = 50051, scheduler_port: int = 50052) -> None:
    STATE_DIR.mkdir(exist_ok=True)  # noqa: ASYNC240 - once, before anything runs
    redis_server: RedisServer | None = None
    redis_url = os.environ.get("KILN_REDIS_URL")
    if not redis_url:
        redis_server = RedisServer((STATE_DIR / "redis").resolve(), appendonly=True)
        redis_server.start()
        redis_url = redis_server.url
    REDIS_URL_FILE.write_text(redis_url)
    env = {
        **os.environ,
        "KILN_REDIS_URL": redis_url,
        "KILN_SCHEDULER_PORT": str(scheduler_port),
        "KILN_SCHEDULER_ADDRESS": f"127.0.0.1:{scheduler_port}",
        "KILN_GATEWAY_HTTP_PORT": str(http_port),
        "KILN_GATEWAY_GRPC_PORT": str(grpc_port),
    }
    procs: list[asyncio.subprocess.Process] = []
    try:
        for module in ("services.scheduler", "services.gpu_worker", "services.gateway"):
            proc, ready = await _start(module, env)
            procs.append(proc)
            print(ready, file=sys.stderr)
        redis = Redis.from_url(redis_url)
        key = await ApiKeys(redis).create("dev")
        await redis.aclose()
        print(_banner(key, str(http_port), str(grpc_port)), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        waiters = [asyncio.create_task(p.wait()) for p in procs]
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([*waiters, stopper], return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        stopper.cancel()
    finally:
        for proc in reversed(procs):
            if proc.returncode is None:
                proc.terminate()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), timeout=10)
                if proc.returncode is None:
                    proc.kill()
        if redis_server is not None:
            redis_server.stop()
