"""Wires the worker together: start the pipeline processes, then hold the link to the scheduler."""

from __future__ import annotations

import asyncio
import logging
import os
import socket

import torch

from libs.serving import serve
from libs.settings import WorkerSettings
from services.gpu_worker.link import WorkerLink
from services.gpu_worker.process_runner import ProcessRunner
from services.gpu_worker.runner import PipelineRunner
from services.gpu_worker.vram import probe_for

log = logging.getLogger(__name__)


def detect_device() -> str:
    # Asks the driver without creating a CUDA context: that is for the pipeline processes only.
    return "cuda" if torch.cuda.is_available() else "cpu"


class WorkerApp:
    def __init__(self, settings: WorkerSettings, runner: PipelineRunner | None = None) -> None:
        self.settings = settings
        device = detect_device() if settings.worker_device == "auto" else settings.worker_device
        self.runner = runner or ProcessRunner(
            settings.catalog(),
            device,
            settings.worker_slots,
            settings.worker_models,
            probe=probe_for(settings.fake_vram_total_bytes, settings.fake_vram_free_bytes),
            faults=settings.faults,
        )
        self.worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.link: WorkerLink | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Here rather than in __init__: `serve` configures logging between the two.
        if self.settings.faults:
            log.warning(
                "FAULT INJECTION IS ON: this worker will fail jobs on purpose (%d rules: %s)",
                len(self.settings.faults),
                [rule.model_dump(exclude_defaults=True) for rule in self.settings.faults],
            )
        await self.runner.start()
        for model, reason in self.runner.models().failed.items():
            log.error("model %s is unavailable on this worker: %s", model, reason)
        self.link = WorkerLink(
            scheduler_address=self.settings.scheduler_address,
            worker_id=self.worker_id,
            slots=self.settings.worker_slots,
            prefetch=self.settings.worker_prefetch,
            runner=self.runner,
        )
        self._task = asyncio.create_task(self.link.run_forever(self.settings.reconnect_seconds))

    def ready_info(self) -> dict[str, int]:
        return {"slots": self.settings.worker_slots}

    async def stop(self) -> None:
        if self.link is not None:
            await self.link.drain(self.settings.worker_drain_seconds)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.runner.close()


async def main() -> None:
    settings = WorkerSettings()
    await serve("gpu_worker", settings, WorkerApp(settings))


if __name__ == "__main__":
    asyncio.run(main())
