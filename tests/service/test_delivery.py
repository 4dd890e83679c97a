"""At-least-once delivery under leases: stale attempts are fenced off, expired leases are reaped,
failures are retried by reason with backoff, and what cannot succeed ends on the dead-letter list.

The workers here speak the protocol by hand (tests/service/wire_worker.py), so each test decides
exactly when a worker goes silent, reports late or fails.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from google.rpc import status_pb2
from kiln.scheduler.v1 import scheduler_service_pb2 as spb
from kiln.scheduler.v1 import scheduler_service_pb2_grpc as spb_grpc
from kiln.v1 import job_pb2
from kiln.worker.v1 import worker_service_pb2 as pb
from redis.asyncio import Redis

from libs import redis_keys as keys
from libs.catalog import ModelSpec
from libs.convert import error_from_pb
from libs.jobs import TextToImage
from libs.settings import SchedulerSettings
from libs.tiers import DEFAULT_TIERS
from services.scheduler.admission import terms
from services.scheduler.app import SchedulerApp
from services.scheduler.dead_letters import DeadLetters
from tests.conftest import TEST_TIERS, Stack
from tests.service.wire_worker import WireWorker, submit

GiB = 1 << 30
Job = job_pb2.Job


# Served only by the hand-driven workers here, one model per test, so the stack's own worker never
# takes their jobs (it shares the Redis).
WIRE_MODELS = {
    name: ModelSpec(source="/nonexistent", size_multiple=16, default_size=64, default_steps=4)
    for name in (
        "wire",
        "wire-oom",
        "wire-oom2",
        "wire-poison",
        "wire-drain",
        "wire-broken",
        "wire-gap",
        "wire-gap2",
        "wire-gap3",
        "wire-idle",
        "wire-race",
        "wire-move",
        "wire-backoff",
        "wire-prefetch",
        "wire-takeover",
        "wire-noimg",
        "wire-garbled",
    )
}


@pytest.fixture(scope="module")
async def sched(stack: Stack) -> AsyncIterator[SchedulerApp]:
    app = SchedulerApp(
        SchedulerSettings(
            redis_url=stack.redis_url,
            scheduler_port=0,
            models={**stack.scheduler.settings.models, **WIRE_MODELS},
            lease_seconds=1.0,
            heartbeat_interval_ms=100,
            housekeeping_interval_seconds=0.05,
            tiers=TEST_TIERS,
            retry_backoff_base_seconds=0.05,
            retry_backoff_max_seconds=0.2,
            recovery_grace_seconds=0.5,
            shutdown_grace_seconds=0.5,
        )
    )
    await app.start()
    yield app
    await app.stop()


def target(app: SchedulerApp) -> str:
    return f"127.0.0.1:{app.port}"


async def get_job(app: SchedulerApp, tenant: str, name: str) -> Job:
    async with grpc.aio.insecure_channel(target(app)) as channel:
        reply = await spb_grpc.SchedulerServiceStub(channel).GetJob(
            spb.GetJobRequest(tenant=tenant, name=name)
        )
    return reply.job


async def wait_job(
    app: SchedulerApp, tenant: str, name: str, done: Callable[[Job], bool], within: float = 10
) -> Job:
    deadline = time.monotonic() + within
    while True:
        job = await get_job(app, tenant, name)
        if done(job) or time.monotonic() > deadline:
            return job
        await asyncio.sleep(0.05)


def ended(job: Job) -> bool:
    return job.state in (Job.STATE_SUCCEEDED, Job.STATE_FAILED, Job.STATE_CANCELLED)


def reason_of(status: status_pb2.Status) -> str:
    return error_from_pb(status).reason


def metadata_of(status: status_pb2.Status) -> dict[str, str]:
    return error_from_pb(status).metadata


async def test_a_stale_result_after_the_lease_was_reaped_is_rejected(sched: SchedulerApp) -> None:
    silent = await WireWorker(target(sched), "silent-1", ["wire"], heartbeat_s=None).start()
    job = await submit(target(sched), "tenant-stale", "wire", "stale")
    first = await silent.next_assignment()
    assert first.attempt == 1
    await silent.progress(first, 1)
    # No heartbeat: the lease (1 s) expires, the reaper hands the job to the next worker.
    healthy = await WireWorker(target(sched), "healthy-1", ["wire"]).start()
    try:
        second = await healthy.next_assignment()
        assert (second.job_id, second.attempt) == (first.job_id, 2)
        await healthy.complete(second, b"from attempt 2")
        done = await wait_job(sched, "tenant-stale", job.name, ended)
        assert done.state == Job.STATE_SUCCEEDED
        # The silent worker wakes up and reports its old attempt: fenced off.
        await silent.complete(first, b"stale attempt 1")
        await asyncio.sleep(0.3)
        final = await get_job(sched, "tenant-stale", job.name)
        assert final.state == Job.STATE_SUCCEEDED and final.attempt == 2
        assert [a.sha256 for a in final.artifacts] == [
            __import__("hashlib").sha256(b"from attempt 2").hexdigest()
        ]
        assert [(a.attempt, a.worker, a.outcome) for a in final.attempts] == [
            (1, "silent-1", job_pb2.Attempt.OUTCOME_FAILED),
            (2, "healthy-1", job_pb2.Attempt.OUTCOME_SUCCEEDED),
        ]
        assert reason_of(final.attempts[0].error) == "WORKER_CRASHED"
        redis = Redis.from_url(sched.settings.redis_url)
        blob = await redis.get(keys.artifact("tenant-stale", job.name.split("/")[1], 0))
        await redis.aclose()
        assert blob == b"from attempt 2"
    finally:
        await silent.close()
        await healthy.close()


async def test_a_job_three_times_longer_than_its_lease_runs_once_while_heartbeats_flow(
    sched: SchedulerApp,
) -> None:
    worker = await WireWorker(target(sched), "steady-1", ["wire"]).start()
    job = await submit(target(sched), "tenant-long", "wire", "long")
    a = await worker.next_assignment()
    # Another worker with room waits the whole time: the job must never be handed to it.
    other = await WireWorker(target(sched), "idle-1", ["wire"]).start()
    try:
        for step in range(1, 4):
            await asyncio.sleep(1.0)  # 3 s in all, three lease lengths
            await worker.progress(a, step)
        await worker.complete(a, b"once")
        done = await wait_job(sched, "tenant-long", job.name, ended)
        assert done.state == Job.STATE_SUCCEEDED and done.attempt == 1
        assert other.assignments.empty() and worker.assignments.empty()
        assert worker.cancels.empty()
    finally:
        await worker.close()
        await other.close()


async def test_out_of_memory_retries_with_memory_savers_then_only_on_a_bigger_gpu(
    sched: SchedulerApp,
) -> None:
    small = await WireWorker(target(sched), "small-gpu", ["wire-oom"], vram_free=8 * GiB).start()
    try:
        job = await submit(target(sched), "tenant-oom", "wire-oom", "big picture")
        oom = {
            "vram_total_bytes": str(24 * GiB),
            "vram_free_bytes": str(8 * GiB),
            "vram_needed_bytes": str(12 * GiB),
        }
        first = await small.next_assignment()
        assert not first.options.memory_savers
        await small.fail(first, "RESOURCE_EXHAUSTED", "OUT_OF_MEMORY", oom)
        second = await small.next_assignment()
        assert second.attempt == 2 and second.options.memory_savers and not second.options.full_precision
        big = await WireWorker(target(sched), "big-gpu", ["wire-oom"], vram_free=80 * GiB).start()
        try:
            await small.fail(second, "RESOURCE_EXHAUSTED", "OUT_OF_MEMORY", oom)
            third = await big.next_assignment()
            assert third.attempt == 3 and third.options.memory_savers
            assert small.assignments.empty()
            await big.complete(third, b"fits")
            done = await wait_job(sched, "tenant-oom", job.name, ended)
        finally:
            await big.close()
        assert done.state == Job.STATE_SUCCEEDED
        assert [(a.worker, a.route) for a in done.attempts] == [
            ("small-gpu", job_pb2.Attempt.ROUTE_STANDARD),
            ("small-gpu", job_pb2.Attempt.ROUTE_MEMORY_SAVERS),
            ("big-gpu", job_pb2.Attempt.ROUTE_LARGER_GPU),
        ]
    finally:
        await small.close()


async def test_out_of_memory_everywhere_fails_with_the_vram_figures_and_is_dead_lettered(
    sched: SchedulerApp,
) -> None:
    only = await WireWorker(target(sched), "only-gpu", ["wire-oom2"], vram_free=8 * GiB).start()
    try:
        job = await submit(target(sched), "tenant-oom2", "wire-oom2", "too big")
        oom = {
            "vram_total_bytes": str(24 * GiB),
            "vram_free_bytes": str(8 * GiB),
            "vram_needed_bytes": str(30 * GiB),
        }
        for attempt in (1, 2):
            a = await only.next_assignment()
            assert a.attempt == attempt
            await only.fail(a, "RESOURCE_EXHAUSTED", "OUT_OF_MEMORY", oom)
        done = await wait_job(sched, "tenant-oom2", job.name, ended)
        assert done.state == Job.STATE_FAILED and done.attempt == 2
        assert reason_of(done.error) == "OUT_OF_MEMORY"
        assert metadata_of(done.error) == oom
        assert "no worker has more than the 8589934592 bytes of free GPU memory" in done.error.message
        buried = await sched.queues.dead_letters(1000)
        assert ("tenant-oom2", job.name.split("/")[1]) in [(t, j) for t, j, _ in buried]
        # An operator requeues it (say, after adding a bigger GPU): it runs on from attempt 3.
        letters = DeadLetters(sched.store, sched.queues, grace_ms=500)
        await letters.requeue("tenant-oom2", job.name[5:])
        third = await only.next_assignment()
        assert (third.job_id, third.attempt) == (job.name[5:], 3)
        assert not third.options.memory_savers  # failure counts and route start over
        await only.complete(third, b"fits now")
        again = await wait_job(sched, "tenant-oom2", job.name, ended)
        assert (again.state, again.attempt) == (Job.STATE_SUCCEEDED, 3)
        assert ("tenant-oom2", job.name[5:]) not in [
            (t, j) for t, j, _ in await sched.queues.dead_letters(1000)
        ]
    finally:
        await only.close()


async def test_a_job_that_takes_its_worker_down_every_time_fails_after_the_maximum(
    sched: SchedulerApp,
) -> None:
    job = await submit(target(sched), "tenant-poison", "wire-poison", "poison")
    workers = []
    for attempt in (1, 2, 3):
        w = await WireWorker(target(sched), f"victim-{attempt}", ["wire-poison"]).start()
        workers.append(w)
        a = await w.next_assignment()
        assert a.attempt == attempt
        await w.progress(a, 1)
        await asyncio.sleep(0.1)
        await w.close()  # the worker dies mid-run
    done = await wait_job(sched, "tenant-poison", job.name, ended)
    assert done.state == Job.STATE_FAILED and done.attempt == 3
    assert reason_of(done.error) == "WORKER_CRASHED"
    assert [reason_of(a.error) for a in done.attempts] == ["WORKER_CRASHED"] * 3
    survivor = await WireWorker(target(sched), "survivor", ["wire-poison"]).start()
    try:
        await asyncio.sleep(0.3)
        assert survivor.assignments.empty()  # nothing loops back
    finally:
        await survivor.close()


async def test_a_draining_worker_hands_jobs_back_without_a_failure(sched: SchedulerApp) -> None:
    leaving = await WireWorker(target(sched), "leaving", ["wire-drain"], prefetch=1).start()
    job1 = await submit(target(sched), "tenant-drain", "wire-drain", "one")
    job2 = await submit(target(sched), "tenant-drain", "wire-drain", "two")
    a1, a2 = await leaving.next_assignment(), await leaving.next_assignment()
    await leaving.drain()
    await leaving.release(a2)
    staying = await WireWorker(target(sched), "staying", ["wire-drain"]).start()
    try:
        b2 = await staying.next_assignment()
        assert (b2.job_id, b2.attempt) == (a2.job_id, 2)
        await staying.complete(b2, b"two")
        await leaving.complete(a1, b"one")
        done1 = await wait_job(sched, "tenant-drain", job1.name, ended)
        done2 = await wait_job(sched, "tenant-drain", job2.name, ended)
        assert (done1.state, done1.attempt) == (Job.STATE_SUCCEEDED, 1)
        assert (done2.state, done2.attempt) == (Job.STATE_SUCCEEDED, 2)
        assert [a.outcome for a in done2.attempts] == [
            job_pb2.Attempt.OUTCOME_RELEASED,
            job_pb2.Attempt.OUTCOME_SUCCEEDED,
        ]
        assert leaving.assignments.empty()
    finally:
        await leaving.close()
        await staying.close()


async def test_the_reaper_finishes_a_create_whose_enqueue_never_came(sched: SchedulerApp) -> None:
    spec = TextToImage("gap", "", 64, 64, 4, 7.5, 1, 1)
    worker = await WireWorker(target(sched), "gap-worker", ["wire-gap"]).start()
    try:
        # The submitter records its intent, creates the job, and dies before putting it in line.
        record, _ = await sched.store.create(
            "tenant-gap", "wire-gap", spec, terms("pro", DEFAULT_TIERS["pro"], 1)
        )
        await sched.queues.intend("enqueue", "tenant-gap", record.id, grace_ms=300)
        a = await worker.next_assignment()
        assert (a.job_id, a.attempt) == (record.id, 1)
        await worker.complete(a, b"found")
        done = await wait_job(sched, "tenant-gap", f"jobs/{record.id}", ended)
        assert done.state == Job.STATE_SUCCEEDED
        assert await sched.redis.zcard(keys.intents()) == 0
    finally:
        await worker.close()


async def test_the_reaper_requeues_a_claim_that_never_started(sched: SchedulerApp) -> None:
    job = await submit(target(sched), "tenant-gap2", "wire-gap2", "claimed by a ghost")
    # A replica claims it (lease, attempt 1) and dies before marking it RUNNING.
    claim = await sched.queues.claim("ghost", ["wire-gap2"], 300)
    assert claim is not None and claim.attempt == 1
    worker = await WireWorker(target(sched), "gap2-worker", ["wire-gap2"]).start()
    try:
        a = await worker.next_assignment()
        assert (a.job_id, a.attempt) == (claim.job_id, 2)
        await worker.complete(a, b"ok")
        done = await wait_job(sched, "tenant-gap2", job.name, ended)
        assert (done.state, done.attempt) == (Job.STATE_SUCCEEDED, 2)
        assert [a.worker for a in done.attempts] == ["gap2-worker"]
    finally:
        await worker.close()


async def test_the_reaper_fails_a_queue_timeout_whose_replica_died(sched: SchedulerApp) -> None:
    spec = TextToImage("late", "", 64, 64, 4, 7.5, 1, 1)
    record, _ = await sched.store.create(
        "tenant-gap3", "wire-gap3", spec, terms("pro", DEFAULT_TIERS["pro"], 1), queue_timeout_ms=100
    )
    # Taken out of line at its deadline; the replica died before marking it failed.
    await sched.queues.intend("expire", "tenant-gap3", record.id, grace_ms=100)
    done = await wait_job(sched, "tenant-gap3", f"jobs/{record.id}", ended)
    assert done.state == Job.STATE_FAILED
    assert reason_of(done.error) == "QUEUE_TIMEOUT"


async def _policy_units(redis: Redis, tenant: str) -> dict[str, float]:
    out = {}
    for name in ("cu", "daily_cu", "requests"):
        raw: bytes | None = await redis.get(keys.rate_policy(tenant, name))  # type: ignore[assignment]
        out[name] = float(raw.split(b":")[0]) if raw else 0.0
    return out


async def test_a_job_that_never_ran_is_refunded_once(sched: SchedulerApp) -> None:
    redis = sched.redis
    first = await submit(target(sched), "tenant-refund", "wire-idle", "one", tier="slow-drain")
    second = await submit(target(sched), "tenant-refund", "wire-idle", "two", tier="slow-drain")
    assert first.cost_units == 1
    before = await _policy_units(redis, "tenant-refund")
    assert [round(before[p], 3) for p in ("cu", "daily_cu")] == [2.0, 2.0]
    async with grpc.aio.insecure_channel(target(sched)) as channel:
        stub = spb_grpc.SchedulerServiceStub(channel)
        cancelled = await stub.CancelJob(spb.CancelJobRequest(tenant="tenant-refund", name=first.name))
        assert cancelled.job.state == Job.STATE_CANCELLED
        after = await _policy_units(redis, "tenant-refund")
        # The compute-unit policies get the job's unit back (less the sliver that drained since),
        # the request count does not: the call was made.
        assert [round(after[p], 3) for p in ("cu", "daily_cu")] == [1.0, 1.0]
        assert round(after["requests"], 3) == round(before["requests"], 3) == 2.0  # calls are not refunded
        with pytest.raises(grpc.aio.AioRpcError) as again:
            await stub.CancelJob(spb.CancelJobRequest(tenant="tenant-refund", name=first.name))
        assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert await _policy_units(redis, "tenant-refund") == after
        await stub.CancelJob(spb.CancelJobRequest(tenant="tenant-refund", name=second.name))
    drained = await _policy_units(redis, "tenant-refund")
    assert 0.0 <= drained["cu"] < 0.01 and 0.0 <= drained["daily_cu"] < 0.01
    assert await redis.hget(keys.job("tenant-refund", first.name[5:]), "refunded") == b"1"


async def test_a_model_no_worker_can_load_fails_its_jobs_and_an_operator_can_requeue_them(
    sched: SchedulerApp,
) -> None:
    broken = await WireWorker(
        target(sched), "broken-loader", ["wire"], failed_models={"wire-broken": "header too large"}
    ).start()
    try:
        job = await submit(target(sched), "tenant-broken", "wire-broken", "never loads")
        done = await wait_job(sched, "tenant-broken", job.name, ended)
        assert done.state == Job.STATE_FAILED and done.attempt == 0
        assert reason_of(done.error) == "MODEL_LOAD_FAILED"
        assert "no worker can load model wire-broken" in done.error.message
        assert "header too large" in done.error.message
        letters = DeadLetters(sched.store, sched.queues, grace_ms=500)
        assert job.name in [d.record.name for d in await letters.list(1000)]
    finally:
        await broken.close()
    fixed = await WireWorker(target(sched), "fixed-loader", ["wire-broken"]).start()
    try:
        reopened = await letters.requeue("tenant-broken", job.name[5:])
        assert reopened.state.value == "QUEUED"
        a = await fixed.next_assignment()
        await fixed.complete(a, b"loaded at last")
        again = await wait_job(sched, "tenant-broken", job.name, ended)
        assert again.state == Job.STATE_SUCCEEDED and not again.HasField("error")
        assert job.name not in [d.record.name for d in await letters.list(1000)]
    finally:
        await fixed.close()


async def test_a_cancel_that_meets_completion_ends_the_job_once_and_spares_the_next_job(
    sched: SchedulerApp,
) -> None:
    worker = await WireWorker(target(sched), "racer", ["wire-race"]).start()
    try:
        job_a = await submit(target(sched), "tenant-race2", "wire-race", "a")
        a = await worker.next_assignment()
        async with grpc.aio.insecure_channel(target(sched)) as channel:
            stub = spb_grpc.SchedulerServiceStub(channel)
            # The completion and the cancel cross on the wire.
            _, cancel = await asyncio.gather(
                worker.complete(a, b"a"),
                stub.CancelJob(spb.CancelJobRequest(tenant="tenant-race2", name=job_a.name)),
                return_exceptions=True,
            )
        if isinstance(cancel, grpc.aio.AioRpcError):  # the completion got there first
            assert cancel.code() == grpc.StatusCode.FAILED_PRECONDITION
        done_a = await wait_job(sched, "tenant-race2", job_a.name, ended)
        job_b = await submit(target(sched), "tenant-race2", "wire-race", "b")
        b = await worker.next_assignment()
        await asyncio.sleep(0.2)
        cancels = []
        while not worker.cancels.empty():
            cancels.append(worker.cancels.get_nowait())
        assert all(c.job_id == a.job_id for c in cancels)
        await worker.complete(b, b"b")
        done_b = await wait_job(sched, "tenant-race2", job_b.name, ended)
        assert done_b.state == Job.STATE_SUCCEEDED
        assert done_a.state in (Job.STATE_SUCCEEDED, Job.STATE_CANCELLED)
        stream = keys.job_events("tenant-race2", a.job_id)
        events: list[tuple[bytes, dict[bytes, bytes]]] = await sched.redis.xrange(stream)  # type: ignore[assignment]
        states = [fields[b"state"] for _, fields in events]
        terminal = [s for s in states if s in (b"SUCCEEDED", b"FAILED", b"CANCELLED")]
        assert len(terminal) == 1
    finally:
        await worker.close()


async def test_a_scheduler_shutting_down_hands_its_workers_jobs_back_to_run_elsewhere(
    sched: SchedulerApp, stack: Stack
) -> None:
    leaving = SchedulerApp(
        SchedulerSettings(
            redis_url=stack.redis_url,
            scheduler_port=0,
            models={**stack.scheduler.settings.models, **WIRE_MODELS},
            shutdown_grace_seconds=0.5,
        )
    )
    await leaving.start()
    on_leaving = await WireWorker(target(leaving), "on-leaving", ["wire-move"]).start()
    job = await submit(target(sched), "tenant-move", "wire-move", "move me")
    a = await on_leaving.next_assignment()
    await on_leaving.progress(a, 1)
    await leaving.stop()
    staying = await WireWorker(target(sched), "on-staying", ["wire-move"]).start()
    try:
        b = await staying.next_assignment()
        assert (b.job_id, b.attempt) == (a.job_id, 2)
        await staying.complete(b, b"moved")
        done = await wait_job(sched, "tenant-move", job.name, ended)
        assert done.state == Job.STATE_SUCCEEDED
        assert [a.outcome for a in done.attempts] == [
            job_pb2.Attempt.OUTCOME_RELEASED,
            job_pb2.Attempt.OUTCOME_SUCCEEDED,
        ]
        assert await sched.redis.hget(keys.job("tenant-move", a.job_id), "failures") == b"{}"
    finally:
        await on_leaving.close()
        await staying.close()


async def test_a_draining_worker_that_runs_out_of_time_is_not_counted_as_a_crash(sched: SchedulerApp) -> None:
    leaving = await WireWorker(target(sched), "out-of-time", ["wire-drain"]).start()
    job = await submit(target(sched), "tenant-drain2", "wire-drain", "slow")
    a = await leaving.next_assignment()
    await leaving.progress(a, 1)
    await leaving.drain()
    await asyncio.sleep(0.1)
    await leaving.close()  # its drain time ran out with the job unfinished
    staying = await WireWorker(target(sched), "after-drain", ["wire-drain"]).start()
    try:
        b = await staying.next_assignment()
        assert (b.job_id, b.attempt) == (a.job_id, 2)
        await staying.complete(b, b"done")
        done = await wait_job(sched, "tenant-drain2", job.name, ended)
        assert [a.outcome for a in done.attempts] == [
            job_pb2.Attempt.OUTCOME_RELEASED,
            job_pb2.Attempt.OUTCOME_SUCCEEDED,
        ]
        assert await sched.redis.hget(keys.job("tenant-drain2", a.job_id), "failures") == b"{}"
    finally:
        await staying.close()


async def test_cancelling_a_job_waiting_out_its_backoff_takes_it_out_without_dispatch(stack: Stack) -> None:
    patient = SchedulerApp(
        SchedulerSettings(
            redis_url=stack.redis_url,
            scheduler_port=0,
            models={**stack.scheduler.settings.models, **WIRE_MODELS},
            retry_backoff_base_seconds=30,
            retry_backoff_max_seconds=30,
            shutdown_grace_seconds=0.5,
        )
    )
    await patient.start()
    worker = await WireWorker(target(patient), "backoff-worker", ["wire-backoff"]).start()
    try:
        job = await submit(target(patient), "tenant-backoff", "wire-backoff", "crashes once")
        a = await worker.next_assignment()
        await worker.fail(a, "UNAVAILABLE", "WORKER_CRASHED", {"signal": "9"})
        waiting = await wait_job(patient, "tenant-backoff", job.name, lambda j: j.state == Job.STATE_QUEUED)
        assert waiting.state == Job.STATE_QUEUED
        job_id = job.name.removeprefix("jobs/").encode()
        assert [m for m in await patient.redis.zrange(keys.delayed(), 0, -1) if job_id in m] != []
        async with grpc.aio.insecure_channel(target(patient)) as channel:
            reply = await spb_grpc.SchedulerServiceStub(channel).CancelJob(
                spb.CancelJobRequest(tenant="tenant-backoff", name=job.name)
            )
        assert reply.job.state == Job.STATE_CANCELLED
        assert [m for m in await patient.redis.zrange(keys.delayed(), 0, -1) if job_id in m] == []
        assert worker.assignments.empty()
    finally:
        await worker.close()
        await patient.stop()


async def test_a_cancelled_prefetched_job_handed_back_ends_cancelled_without_running(
    sched: SchedulerApp,
) -> None:
    holder = await WireWorker(target(sched), "prefetcher", ["wire-prefetch"], prefetch=1).start()
    first = await submit(target(sched), "tenant-prefetch", "wire-prefetch", "runs")
    second = await submit(target(sched), "tenant-prefetch", "wire-prefetch", "waits in the worker")
    a1, a2 = await holder.next_assignment(), await holder.next_assignment()
    other = await WireWorker(target(sched), "bystander", ["wire-prefetch"]).start()
    try:
        async with grpc.aio.insecure_channel(target(sched)) as channel:
            await spb_grpc.SchedulerServiceStub(channel).CancelJob(
                spb.CancelJobRequest(tenant="tenant-prefetch", name=second.name)
            )
        await holder.drain()
        await holder.release(a2)  # the drain crosses the cancel
        done = await wait_job(sched, "tenant-prefetch", second.name, ended)
        assert (done.state, done.attempt) == (Job.STATE_CANCELLED, 1)
        await holder.complete(a1, b"first")
        assert (await wait_job(sched, "tenant-prefetch", first.name, ended)).state == Job.STATE_SUCCEEDED
        assert other.assignments.empty()
    finally:
        await holder.close()
        await other.close()


async def test_a_cancel_reaches_the_worker_that_took_over_from_a_stale_one(sched: SchedulerApp) -> None:
    silent = await WireWorker(target(sched), "stale-holder", ["wire-takeover"], heartbeat_s=None).start()
    job = await submit(target(sched), "tenant-takeover", "wire-takeover", "taken over")
    a = await silent.next_assignment()
    fresh = await WireWorker(target(sched), "new-holder", ["wire-takeover"]).start()
    try:
        b = await fresh.next_assignment()
        assert b.attempt == 2
        await silent.heartbeat()  # late: told to cancel its attempt, which it forgets
        stale_cancel = await asyncio.wait_for(silent.cancels.get(), 5)
        assert (stale_cancel.job_id, stale_cancel.attempt) == (a.job_id, 1)
        async with grpc.aio.insecure_channel(target(sched)) as channel:
            await spb_grpc.SchedulerServiceStub(channel).CancelJob(
                spb.CancelJobRequest(tenant="tenant-takeover", name=job.name)
            )
        cancel = await asyncio.wait_for(fresh.cancels.get(), 5)
        assert (cancel.job_id, cancel.attempt) == (a.job_id, 2)
    finally:
        await silent.close()
        await fresh.close()


async def test_a_result_without_its_images_is_never_a_success(sched: SchedulerApp) -> None:
    worker = await WireWorker(target(sched), "forgetful", ["wire-noimg"]).start()
    try:
        job = await submit(target(sched), "tenant-noimg", "wire-noimg", "one image please")
        a = await worker.next_assignment()
        await worker.send(pb.ConnectRequest(completed=pb.JobCompleted(job_id=a.job_id, attempt=a.attempt)))
        b = await worker.next_assignment()
        assert b.attempt == 2
        await worker.complete(b, b"the image")
        done = await wait_job(sched, "tenant-noimg", job.name, ended)
        assert done.state == Job.STATE_SUCCEEDED and len(done.artifacts) == 1
        assert reason_of(done.attempts[0].error) == "RESULT_CORRUPTED"
    finally:
        await worker.close()


async def test_a_malformed_failure_fails_the_job_and_keeps_the_stream(sched: SchedulerApp) -> None:
    worker = await WireWorker(target(sched), "garbled", ["wire-garbled"]).start()
    try:
        job = await submit(target(sched), "tenant-garbled", "wire-garbled", "garbled")
        a = await worker.next_assignment()
        bad = pb.JobFailed(job_id=a.job_id, attempt=a.attempt, error=status_pb2.Status(code=99))
        await worker.send(pb.ConnectRequest(failed=bad))
        done = await wait_job(sched, "tenant-garbled", job.name, ended)
        assert done.state == Job.STATE_FAILED
        error = error_from_pb(done.error)
        assert (error.code, error.reason) == ("UNKNOWN", "UNKNOWN")
        nxt = await submit(target(sched), "tenant-garbled", "wire-garbled", "next")
        b = await worker.next_assignment()  # the same stream goes on
        assert b.job_id == nxt.name[5:]
        await worker.complete(b, b"fine")
    finally:
        await worker.close()


async def test_a_second_stream_with_the_same_worker_id_is_refused(sched: SchedulerApp) -> None:
    first = await WireWorker(target(sched), "twin", ["wire"]).start()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await WireWorker(target(sched), "twin", ["wire"]).start()
        assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    finally:
        await first.close()
