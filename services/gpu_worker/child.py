"""The pipeline child process: loads the worker's models once, then runs one job at a time.

Its main thread runs pipelines; a second thread reads the pipe, so a cancel sets the run's event
while the main thread is deep in the denoising loop and lands at the next step callback.
"""

from __future__ import annotations

import gc
import logging
import queue
import signal
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection

import torch
from diffusers import DiffusionPipeline

import services.gpu_worker.quiet  # noqa: F401  (before diffusers is imported)
from libs.catalog import ModelSpec
from services.gpu_worker.child_messages import Cancel, Outcome, Ready, Run, Step, Stop
from services.gpu_worker.faults import FaultRule, first_match
from services.gpu_worker.generate import generate
from services.gpu_worker.loader import load_pipeline
from services.gpu_worker.runner import (
    Generated,
    ModelLoadError,
    OutOfMemory,
    PipelineError,
    RunError,
    Vram,
)
from services.gpu_worker.vram import VramProbe, needed_bytes

log = logging.getLogger(__name__)


def main(
    conn: Connection,
    catalog: dict[str, ModelSpec],
    models: Sequence[str],
    device: str,
    probe: VramProbe,
    faults: Sequence[FaultRule],
) -> None:
    # Ctrl-C reaches the whole process group; the worker decides when its children stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pipes: dict[str, DiffusionPipeline] = {}
    failed: dict[str, str] = {}
    for model in models:
        spec = catalog.get(model)
        try:
            if spec is None:
                raise ModelLoadError(model, f"model {model!r} is not in the catalog")
            pipes[model] = load_pipeline(spec.model_copy(update={"name": model}), device)
        except ModelLoadError as exc:
            failed[model] = str(exc)
    conn.send(Ready(list(pipes), failed, _read(probe)))

    runs: queue.Queue[Run | None] = queue.Queue()
    cancels: dict[int, threading.Event] = {}
    threading.Thread(target=_read_pipe, args=(conn, runs, cancels), daemon=True).start()
    while (run := runs.get()) is not None:
        cancel = cancels[run.run_id]
        try:
            result = _run(run, pipes, failed, cancel, probe, faults, conn)
        finally:
            cancels.pop(run.run_id, None)
        conn.send(Outcome(run.run_id, result, _read(probe)))


def _read_pipe(conn: Connection, runs: queue.Queue[Run | None], cancels: dict[int, threading.Event]) -> None:
    try:
        while not isinstance(msg := conn.recv(), Stop):
            if isinstance(msg, Run):
                # Made here, before the run is queued, so a cancel that follows always finds it.
                cancels[msg.run_id] = threading.Event()
                runs.put(msg)
            elif isinstance(msg, Cancel) and (event := cancels.get(msg.run_id)) is not None:
                event.set()
    except (EOFError, OSError):
        pass  # the worker is gone: stop as if told to
    runs.put(None)


def _run(
    run: Run,
    pipes: dict[str, DiffusionPipeline],
    failed: dict[str, str],
    cancel: threading.Event,
    probe: VramProbe,
    faults: Sequence[FaultRule],
    conn: Connection,
) -> Generated | RunError:
    pipe = pipes.get(run.model)
    if pipe is None:
        reason = failed.get(run.model, f"model {run.model!r} is not loaded on this worker")
        return ModelLoadError(run.model, reason)
    fault = first_match(
        faults,
        prompt=run.spec.prompt,
        model=run.model,
        attempt=run.attempt,
        memory_savers=run.options.memory_savers,
        full_precision=run.options.full_precision,
    )

    def on_step(step: int, total: int) -> None:
        conn.send(Step(run.run_id, step, total))

    try:
        return generate(pipe, run.spec, on_step, cancel, run.options, fault)
    except RunError as exc:
        return exc
    except torch.OutOfMemoryError as exc:
        vram = _read(probe)
        # The allocator keeps freed blocks cached; hand them back so the next job starts clean.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        injected = fault is not None and fault.kind == "oom"
        needed = fault.vram_needed_bytes if fault is not None and injected else needed_bytes(str(exc))
        message = "the GPU ran out of memory running the pipeline"
        return OutOfMemory(message, vram.total_bytes, vram.free_bytes, needed, run.options.memory_savers)
    except Exception as exc:
        log.exception("job %s attempt %d: the pipeline failed", run.job_id, run.attempt)
        return PipelineError(f"{type(exc).__name__}: {exc}")


def _read(probe: VramProbe) -> Vram:
    return Vram(probe.total_bytes(), probe.free_bytes())
