"""The `kiln` command: run the suite locally, manage API keys, generate images."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from kiln.v1 import job_pb2
from redis.asyncio import Redis
from redis.exceptions import RedisError

from libs.api_keys import ApiKeys
from libs.cli.devstack import REDIS_URL_FILE, run_stack
from libs.cli.generate import generate
from libs.errors import KilnError
from libs.settings import CommonSettings, SchedulerSettings


def _redis_url(given: str | None) -> str:
    if given:
        return given
    if os.environ.get("KILN_REDIS_URL"):
        return os.environ["KILN_REDIS_URL"]
    if REDIS_URL_FILE.exists():  # the private Redis that `kiln up` started
        return REDIS_URL_FILE.read_text().strip()
    return "redis://127.0.0.1:6379/0"


def _key_id(given: str) -> str:
    """The id part of `kiln_<id>_<secret>`, so a whole key works where an id is asked for."""
    return given.split("_")[1] if given.startswith("kiln_") and given.count("_") >= 2 else given


def _env_port(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise SystemExit(f"{name} must be a port number (1-65535), got {value!r}")
    return int(value)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _configured_tier(tier: str) -> str:
    tiers = CommonSettings().tier_table()  # the same config the services read (KILN_CONFIG)
    if tier not in tiers:
        raise SystemExit(f"no tier {tier!r}: configured tiers are {', '.join(sorted(tiers))}")
    return tier


async def _keys(args: argparse.Namespace) -> None:
    if args.keys_command in ("create", "set-tier"):
        _configured_tier(args.tier)
    if args.keys_command in ("revoke", "set-tier"):
        args.key_id = _key_id(args.key_id)
    redis = Redis.from_url(_redis_url(args.redis_url))
    keys = ApiKeys(redis)
    try:
        if args.keys_command == "create":
            key = await keys.create(args.tenant, args.tier)
            print(key)
            print(f"key id {_key_id(key)} (for set-tier and revoke)", file=sys.stderr)
        elif args.keys_command == "set-tier":
            if not await keys.set_tier(args.key_id, args.tier):
                raise SystemExit(f"no key with id {args.key_id}")
            print(f"{args.key_id} is now on the {args.tier} tier")
        elif args.keys_command == "revoke":
            if not await keys.revoke(args.key_id):
                raise SystemExit(f"no key with id {args.key_id}")
            print(f"revoked {args.key_id}")
        else:
            for info in await keys.list_keys():
                print(f"{info.key_id}  tenant={info.tenant}  tier={info.tier}")
    finally:
        await redis.aclose()


async def _dead_letters(args: argparse.Namespace) -> None:
    from services.scheduler.dead_letters import DeadLetters
    from services.scheduler.queues import Queues
    from services.scheduler.scripts import Scripts
    from services.scheduler.store import JobStore

    settings = SchedulerSettings(redis_url=_redis_url(args.redis_url))
    redis = Redis.from_url(settings.redis_url)
    scripts = Scripts(redis)
    store = JobStore(
        redis, scripts, job_ttl_s=settings.job_ttl_seconds, artifact_ttl_s=settings.artifact_ttl_seconds
    )
    weights = {name: t.dispatch_weight for name, t in settings.tier_table().items()}
    letters = DeadLetters(
        store, Queues(redis, scripts, weights), grace_ms=int(settings.recovery_grace_seconds * 1000)
    )
    try:
        if args.dl_command == "list":
            found = await letters.list(args.limit)
            if not found:
                print("no dead letters", file=sys.stderr)
            for letter in found:
                job, error = letter.record, letter.record.error
                why = f"{error.reason}: {error.message}" if error else "-"
                print(f"{job.tenant}  {job.name}  model={job.model}  attempts={job.attempt}  {why}")
        else:
            failed = 0
            for name in args.jobs:
                try:
                    record = await letters.requeue(args.tenant, name.removeprefix("jobs/"))
                except KilnError as exc:  # say so, and go on with the others
                    print(f"{name}: {exc.message}", file=sys.stderr)
                    failed += 1
                else:
                    print(f"{record.name} requeued ({record.state.value})")
            if failed:
                raise SystemExit(f"{failed} of {len(args.jobs)} not requeued")
    finally:
        await redis.aclose()


def _job(args: argparse.Namespace) -> job_pb2.Job:
    t2i = job_pb2.TextToImage(prompt=args.prompt, negative_prompt=args.negative_prompt)
    for name in ("width", "height", "steps", "seed", "num_images", "guidance_scale"):
        value = getattr(args, name)
        if value is not None:
            setattr(t2i, name, value)
    return job_pb2.Job(model=args.model, text_to_image=t2i)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start Redis, scheduler, a tiny-sd worker and the gateway")
    # The same variables the services read, so `KILN_GATEWAY_HTTP_PORT=18080 make run` works too.
    up.add_argument("--http-port", type=int, default=_env_port("KILN_GATEWAY_HTTP_PORT", 8080))
    up.add_argument("--grpc-port", type=int, default=_env_port("KILN_GATEWAY_GRPC_PORT", 50051))
    up.add_argument("--scheduler-port", type=int, default=_env_port("KILN_SCHEDULER_PORT", 50052))

    keys = sub.add_parser("keys", help="create, revoke and list API keys")
    keys.add_argument("--redis-url", help="default: KILN_REDIS_URL, else the Redis `kiln up` started")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create")
    create.add_argument("--tenant", required=True, help="a-z, 0-9 and '-', up to 63 characters")
    create.add_argument(
        "--tier", default="free", help="free, pro, enterprise or a [tiers.NAME] of the config"
    )
    set_tier = keys_sub.add_parser("set-tier", help="move a key to another tier (applies to its next call)")
    set_tier.add_argument("key_id", help="the 16 hex characters after 'kiln_'")
    set_tier.add_argument("tier", help="free, pro, enterprise or a [tiers.NAME] of the config")
    revoke = keys_sub.add_parser("revoke")
    revoke.add_argument("key_id", help="the 16 hex characters after 'kiln_'")
    keys_sub.add_parser("list")

    dead = sub.add_parser("dead-letters", help="list and requeue jobs that failed after their retries")
    dead.add_argument("--redis-url", help="default: KILN_REDIS_URL, else the Redis `kiln up` started")
    dead_sub = dead.add_subparsers(dest="dl_command", required=True)
    dl_list = dead_sub.add_parser("list", help="oldest first: tenant, job, model, attempts, last error")
    dl_list.add_argument("--limit", type=_positive, default=100, help="at most this many (default: 100)")
    dl_requeue = dead_sub.add_parser("requeue", help="run them again (same job ids, failure counts reset)")
    dl_requeue.add_argument("--tenant", required=True)
    dl_requeue.add_argument("jobs", nargs="+", help="jobs/<id> or <id>")

    gen = sub.add_parser("generate", help="generate an image through the API")
    gen.add_argument("prompt", help="what to draw")
    gen.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("out.png"),
        help="where to save the PNG; with several images, NAME-0.png, NAME-1.png... (default: out.png)",
    )
    gen.add_argument("--model", default="tiny-sd", help="a model of the catalog (default: tiny-sd)")
    gen.add_argument("--negative-prompt", default="", help="what to steer away from")
    gen.add_argument("--width", type=int, help="pixels (default: the model's)")
    gen.add_argument("--height", type=int, help="pixels (default: the model's)")
    gen.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    gen.add_argument("--seed", type=int, help="same seed and parameters, same image (default: random)")
    gen.add_argument("--num-images", type=int, help="images from seed, seed+1, ... (default: 1)")
    gen.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the model's)")
    gen.add_argument(
        "--server",
        default=os.environ.get("KILN_SERVER", "127.0.0.1:50051"),
        help="the gateway's gRPC address (env KILN_SERVER; default: 127.0.0.1:50051)",
    )
    gen.add_argument("--api-key", default=os.environ.get("KILN_API_KEY"), help="env KILN_API_KEY")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.command == "up":
            asyncio.run(run_stack(args.http_port, args.grpc_port, args.scheduler_port))
        elif args.command == "keys":
            asyncio.run(_keys(args))
        elif args.command == "dead-letters":
            asyncio.run(_dead_letters(args))
        else:
            if not args.api_key:
                raise SystemExit("no API key: pass --api-key or set KILN_API_KEY")
            asyncio.run(generate(args.server, args.api_key, _job(args), args.output))
    except KilnError as exc:
        detail = "; ".join(f"{v.field}: {v.description}" for v in exc.violations)
        raise SystemExit(f"error {exc.code} ({exc.reason}): {detail or exc.message}") from None
    except RedisError as exc:
        raise SystemExit(f"cannot reach Redis ({exc}); pass --redis-url or set KILN_REDIS_URL") from None
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
