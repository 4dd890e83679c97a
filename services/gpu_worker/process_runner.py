"""`ProcessRunner`: the `PipelineRunner` that runs pipelines in child processes, one per slot.

A CUDA fault (illegal access, a segfault in a kernel, a hung kernel) kills or poisons the process it
happens in, so the model never runs in the worker's own process. Each child loads the worker's models
once and runs one job at a time; when one dies, its job fails with `WorkerCrashed` and a fresh child
takes its slot. Children come from a forkserver that has already imported torch and diffusers: a
replacement starts in well under a second, and no child is forked from a process that has torch
threads or a CUDA context.

The pipes are read by one thread per child, which hands each message to the event loop, so nothing
here blocks the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import multiprocessing.context
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from libs.catalog import ModelSpec
from libs.jobs import TextToImage
from services.gpu_worker import child as child_module
from services.gpu_worker.child_messages import Cancel, FromChild, Outcome, Ready, Run, Step, Stop
from services.gpu_worker.faults import FaultRule
from services.gpu_worker.runner import (
    PLAIN,
    Cancelled,
    ExecutionTimeout,
    Generated,
    ModelStates,
    ProgressFn,
    RunError,
    RunOptions,
    Vram,
    WorkerCrashed,
)
from services.gpu_worker.vram import TorchVramProbe, VramProbe

log = logging.getLogger(__name__)

# How long a child gets to act on a cancel before it is killed: a hung CUDA kernel never sees one.
# A run past its execution timeout is presumed stuck and gets little; a cancelled one may just be
# in a long step.
TIMEOUT_GRACE_S = 1.0
CANCEL_GRACE_S = 5.0
# A replacement that dies while loading is retried after this long, not in a tight loop.
RESPAWN_DELAY_S = 1.0
STOP_WAIT_S = 5.0
_PRELOAD = ["torch", "diffusers", child_module.__name__]


def _context() -> multiprocessing.context.ForkServerContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


@dataclass
class _Active:
    run_id: int
    future: asyncio.Future[Generated]
    on_step: ProgressFn
    last_step: int = 0


class _Child:
    def __init__(self, slot: int, process: multiprocessing.process.BaseProcess, conn: Connection) -> None:
        loop = asyncio.get_running_loop()
        self.slot = slot
        self.process = process
        self.pid = process.pid or 0
        self.conn = conn
        self.ready: asyncio.Future[None] = loop.create_future()
        self.ready.add_done_callback(_consume)
        self.exited: asyncio.Future[int] = loop.create_future()
        self.active: _Active | None = None
        self.dead = False
        self.reader: threading.Thread | None = None

    def send(self, msg: Run | Cancel | Stop) -> None:
        with contextlib.suppress(OSError):  # it died; its reader thread reports that
            self.conn.send(msg)

    def kill(self) -> None:
        if not self.dead:
            self.process.kill()


class ProcessRunner:
    def __init__(
        self,
        catalog: dict[str, ModelSpec],
        device: str,
        slots: int,
        models: Sequence[str],
        *,
        probe: VramProbe | None = None,
        faults: Sequence[FaultRule] = (),
        cancel_grace_s: float = CANCEL_GRACE_S,
        timeout_grace_s: float = TIMEOUT_GRACE_S,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.device = device
        self._models = list(models)
        self._catalog = {name: spec for name, spec in catalog.items() if name in self._models}
        self._slots = slots
        self._probe: VramProbe = probe or TorchVramProbe()
        self._faults = list(faults)
        self._cancel_grace = cancel_grace_s
        self._timeout_grace = timeout_grace_s
        self._children: dict[int, _Child] = {}
        self._idle: asyncio.Queue[_Child] = asyncio.Queue()
        self._start_lock = asyncio.Lock()
        self._started = False
        self._closing = False
        self._states: dict[str, str | None] = {}
        self._vram = Vram()
        self._run_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        async with self._start_lock:
            if self._started:
                return
            if self._closing:
                raise RuntimeError("the runner is closed")
            children = [await self._spawn(slot) for slot in range(self._slots)]
            self._started = True
            try:
                await asyncio.gather(*(child.ready for child in children))
            except WorkerCrashed as exc:
                raise RuntimeError(f"a pipeline process died while loading the models: {exc}") from exc

    def models(self) -> ModelStates:
        ready = [m for m in self._models if m in self._states and self._states[m] is None]
        failed = {m: reason for m in self._models if (reason := self._states.get(m)) is not None}
        return ModelStates(ready, failed)

    def vram(self) -> Vram:
        return self._vram

    def child_pids(self) -> list[int]:
        """The pids of the live child processes, by slot."""
        return [self._children[slot].pid for slot in sorted(self._children)]

    async def run(
        self,
        model: str,
        spec: TextToImage,
        on_step: ProgressFn,
        cancel: asyncio.Event,
        options: RunOptions = PLAIN,
        *,
        attempt: int = 1,
        execution_timeout_s: float = 0.0,
        job_id: str = "",
    ) -> Generated:
        await self.start()
        if cancel.is_set():
            raise Cancelled(0)
        child = await self._idle.get()
        while child.dead:
            child = await self._idle.get()
        if cancel.is_set():
            self._idle.put_nowait(child)
            raise Cancelled(0)
        active = _Active(next(self._run_ids), asyncio.get_running_loop().create_future(), on_step)
        active.future.add_done_callback(_consume)
        child.active = active
        child.send(Run(active.run_id, job_id, attempt, model, spec, options))
        cancelled = asyncio.ensure_future(cancel.wait())
        try:
            first: set[asyncio.Future[Any]] = {active.future, cancelled}
            await asyncio.wait(
                first,
                timeout=execution_timeout_s or None,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if active.future.done():
                return active.future.result()
            if cancelled.done():
                try:
                    return await self._stop_run(child, active, self._cancel_grace)
                except WorkerCrashed:
                    raise Cancelled(active.last_step) from None
            with contextlib.suppress(RunError):
                await self._stop_run(child, active, self._timeout_grace)
            raise ExecutionTimeout(execution_timeout_s, active.last_step)
        except asyncio.CancelledError:
            # The caller went away: the child still stops, and its slot frees up when it has.
            self._spawn_task(self._stop_run(child, active, self._cancel_grace))
            raise
        finally:
            cancelled.cancel()

    async def close(self) -> None:
        self._closing = True
        children = list(self._children.values())
        for child in children:
            child.send(Stop())
        for child in children:
            try:
                await asyncio.wait_for(asyncio.shield(child.exited), STOP_WAIT_S)
            except TimeoutError:
                child.kill()
                await child.exited
        # Reaps, and replacements that were starting when the close began (they stop themselves).
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _stop_run(self, child: _Child, active: _Active, grace_s: float) -> Generated:
        """Cancels the child's run and waits for it to end; after the grace, kills the child."""
        if not active.future.done():
            child.send(Cancel(active.run_id))
            done, _ = await asyncio.wait({active.future}, timeout=grace_s)
            if not done:
                log.warning("pipeline process %d ignored a cancel for %.1f s; killing it", child.pid, grace_s)
                child.kill()
        return await active.future

    async def _spawn(self, slot: int) -> _Child:
        parent_end, child_end = multiprocessing.Pipe()
        process = _context().Process(
            target=child_module.main,
            args=(child_end, self._catalog, self._models, self.device, self._probe, self._faults),
            name=f"kiln-pipeline-{slot}",
            daemon=True,
        )
        # The first start launches the forkserver, which imports torch: seconds, off the loop.
        await asyncio.to_thread(process.start)
        child_end.close()
        child = _Child(slot, process, parent_end)
        self._children[slot] = child
        loop = asyncio.get_running_loop()
        child.reader = threading.Thread(
            target=_read_pipe, args=(child, loop, self._on_message, self._on_gone), daemon=True
        )
        child.reader.start()
        return child

    def _on_message(self, child: _Child, msg: FromChild) -> None:
        if isinstance(msg, Ready):
            self._states.update(dict.fromkeys(msg.models))
            self._states.update(msg.failed)
            self._vram = msg.vram
            if not child.ready.done():
                child.ready.set_result(None)
            self._idle.put_nowait(child)
            return
        active = child.active
        if active is None or active.run_id != msg.run_id:
            return
        if isinstance(msg, Step):
            active.last_step = msg.step
            try:
                active.on_step(msg.step, msg.total)
            except Exception:
                log.exception("a progress callback failed")
        elif isinstance(msg, Outcome):
            self._vram = msg.vram
            child.active = None
            if isinstance(msg.result, RunError):
                active.future.set_exception(msg.result)
            else:
                active.future.set_result(msg.result)
            self._idle.put_nowait(child)

    def _on_gone(self, child: _Child) -> None:
        child.dead = True
        self._spawn_task(self._reap(child))

    async def _reap(self, child: _Child) -> None:
        await asyncio.to_thread(child.process.join, STOP_WAIT_S)
        if child.process.exitcode is None:  # it closed its pipe but lives on: make sure it is gone
            child.process.kill()
            await asyncio.to_thread(child.process.join)
        code = child.process.exitcode or 0
        if child.reader is not None:
            await asyncio.to_thread(child.reader.join)
        child.conn.close()
        child.process.close()
        was_ready = child.ready.done()
        crash = WorkerCrashed(code)
        if not was_ready:
            child.ready.set_exception(crash)
        if child.active is not None:
            child.active.future.set_exception(crash)
            child.active = None
        if self._children.get(child.slot) is child:
            del self._children[child.slot]
        child.exited.set_result(code)
        if self._closing:
            return
        log.error("pipeline process %d (slot %d) ended: %s", child.pid, child.slot, crash)
        self._spawn_task(self._replace(child.slot, 0.0 if was_ready else RESPAWN_DELAY_S))

    async def _replace(self, slot: int, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        if not self._closing:
            child = await self._spawn(slot)
            if self._closing:
                child.send(Stop())
                await child.exited

    def _spawn_task(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        # A stopped run ends in its own error, which its caller already has or no longer wants.
        if exc is not None and not isinstance(exc, RunError):
            log.error("pipeline process upkeep failed", exc_info=exc)


def _read_pipe(child: _Child, loop: asyncio.AbstractEventLoop, deliver: Any, gone: Any) -> None:
    try:
        while True:
            msg = child.conn.recv()
            loop.call_soon_threadsafe(deliver, child, msg)
    except (EOFError, OSError):
        pass  # the child exited
    except Exception:
        log.exception("cannot read from pipeline process %d", child.pid)
        child.process.kill()
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits on this child any more
        loop.call_soon_threadsafe(gone, child)


def _consume(future: asyncio.Future[Any]) -> None:
    """Marks a future's exception as seen: a run nobody awaits any more may still fail."""
    if not future.cancelled():
        future.exception()
