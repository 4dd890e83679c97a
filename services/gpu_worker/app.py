"""Wires the worker together: load the configured models, then hold the link to the scheduler."""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from libs.serving import serve
from libs.settings import WorkerSettings
from services.gpu_worker.link import WorkerLink
from services.gpu_worker.runner import ModelLoadError, PipelineRunner
from services.gpu_worker.thread_runner import ThreadRunner, detect_device

log = logging.getLogger(__name__)


class WorkerApp:
    def __init__(self, settings: WorkerSettings, runner: PipelineRunner | None = None) -> None:
        self.settings = settings
        device = detect_device() if settings.worker_device == "auto" else settings.worker_device
        self.runner = runner or ThreadRunner(settings.catalog(), device, settings.worker_slots)
        self.worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.link: WorkerLink | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        ready: list[str] = []
        for model in self.settings.worker_models:
            try:
                await self.runner.load(model)
                ready.append(model)
            except ModelLoadError as exc:
                log.error("model %s is unavailable on this worker: %s", model, exc)
        self.link = WorkerLink(
            scheduler_address=self.settings.scheduler_address,
            worker_id=self.worker_id,
            models=ready,
            slots=self.settings.worker_slots,
            runner=self.runner,
        )
        self._task = asyncio.create_task(self.link.run_forever(self.settings.reconnect_seconds))

    def ready_info(self) -> dict[str, int]:
        return {"slots": self.settings.worker_slots}

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.runner.close()


async def main() -> None:
    settings = WorkerSettings()
    await serve("gpu_worker", settings, WorkerApp(settings))


if __name__ == "__main__":
    asyncio.run(main())
