"""`ThreadRunner`: the `PipelineRunner` that runs diffusers pipelines in threads of this process.

Each model gets `slots` pipeline objects that share the weights but not the per-call state that
diffusers keeps on the pipeline, its scheduler and its tokenizer, so up to `slots` runs proceed at once.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import hashlib
import io
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from diffusers import DiffusionPipeline
from PIL.Image import Image as PILImage

from libs.catalog import ModelSpec
from libs.jobs import TextToImage
from services.gpu_worker.loader import load_pipeline
from services.gpu_worker.runner import Cancelled, Image, ModelLoadError, ProgressFn


def detect_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class ThreadRunner:
    def __init__(self, catalog: dict[str, ModelSpec], device: str, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.device = device
        self._catalog = catalog
        self._slots = slots
        # A run holds one unit of `_free` and one of its model's idle pipelines; since no model has
        # more runs than `slots`, a run that gets a unit always finds an idle pipeline.
        self._free = asyncio.Semaphore(slots)
        self._idle: dict[str, list[DiffusionPipeline]] = {}
        self._threads = ThreadPoolExecutor(slots, thread_name_prefix="pipeline")
        # One load at a time, whatever the model: loads are rare and each may need most of the memory.
        self._loading = asyncio.Lock()

    async def load(self, model: str) -> None:
        if model in self._idle:
            return
        async with self._loading:
            if model in self._idle:
                return
            spec = self._catalog.get(model)
            if spec is None:
                raise ModelLoadError(f"model {model!r} is not in the catalog")
            self._idle[model] = await asyncio.to_thread(self._load_slots, spec)

    async def run(
        self, model: str, spec: TextToImage, on_step: ProgressFn, cancel: threading.Event
    ) -> list[Image]:
        await self.load(model)
        await self._free.acquire()
        pipe = self._idle[model].pop()
        loop = asyncio.get_running_loop()

        def release() -> None:
            self._idle[model].append(pipe)
            self._free.release()

        # The context travels with the call (as with asyncio.to_thread) so spans join the job's trace.
        future = self._threads.submit(contextvars.copy_context().run, _generate, pipe, spec, on_step, cancel)
        # Released when the thread is done with the pipeline (or never started it), not when the
        # awaiting task is cancelled: a busy pipeline must not go to the next run.
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(release))
        return await asyncio.wrap_future(future)

    async def close(self) -> None:
        """Waits for pipeline threads to finish; callers cancel their runs first."""
        await asyncio.to_thread(self._threads.shutdown, wait=True, cancel_futures=True)

    def _load_slots(self, spec: ModelSpec) -> list[DiffusionPipeline]:
        pipe = load_pipeline(spec, self.device)
        return [pipe, *(_fork(pipe) for _ in range(self._slots - 1))]


def _fork(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """A pipeline sharing `pipe`'s weights, with its own copies of the stateful non-module parts.

    Schedulers keep the current timesteps, and fast tokenizers reconfigure truncation on every call
    (and refuse concurrent use), so those are copied; the torch modules are read-only at inference.
    """
    clone = copy.copy(pipe)
    for name, component in pipe.components.items():
        if component is not None and not isinstance(component, torch.nn.Module):
            setattr(clone, name, copy.deepcopy(component))
    return clone


def _generate(
    pipe: DiffusionPipeline, spec: TextToImage, on_step: ProgressFn, cancel: threading.Event
) -> list[Image]:
    def on_step_end(
        running: DiffusionPipeline, index: int, timestep: Any, tensors: dict[str, Any]
    ) -> dict[str, Any]:
        step = index + 1
        if cancel.is_set():
            raise Cancelled(step)
        # The pipeline's own count: second-order schedulers call back more often than `spec.steps`.
        on_step(step, running.num_timesteps)
        # Checked again so a cancel raised while reporting this step skips the next UNet pass.
        if cancel.is_set():
            raise Cancelled(step)
        return {}

    if cancel.is_set():
        raise Cancelled(0)
    seeds = spec.image_seeds()
    with torch.inference_mode():
        output = pipe(
            prompt=spec.prompt,
            negative_prompt=spec.negative_prompt or None,
            width=spec.width,
            height=spec.height,
            num_inference_steps=spec.steps,
            guidance_scale=spec.guidance_scale,
            num_images_per_prompt=spec.num_images,
            # One CPU generator per image: image i depends only on seed + i, on any device.
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
            callback_on_step_end=on_step_end,
            output_type="pil",
        )
    return [_encode(image, seed) for image, seed in zip(output.images, seeds, strict=True)]


def _encode(image: PILImage, seed: int) -> Image:
    # PIL writes no timestamp or metadata unless asked, so equal pixels give equal bytes.
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    png = buffer.getvalue()
    return Image(png, hashlib.sha256(png).hexdigest(), seed, image.width, image.height)
