"""One pipeline call: options on for the run, the denoising loop watched, the images checked and encoded.

The same function runs in the child process and (for benchmarks and tests) in-process, so a given
seed gives byte-identical PNGs either way.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import DiffusionPipeline
from PIL import Image as PILImageModule
from PIL.Image import Image as PILImage

from libs.jobs import TextToImage
from services.gpu_worker.faults import FaultRule, oom_message
from services.gpu_worker.runner import (
    PLAIN,
    AppliedOptions,
    Cancelled,
    Generated,
    Image,
    InvalidOutput,
    RunOptions,
)

# Called from the pipeline's thread after each denoising step with (step, total_steps).
StepFn = Callable[[int, int], None]


def generate(
    pipe: DiffusionPipeline,
    spec: TextToImage,
    on_step: StepFn,
    cancel: threading.Event,
    options: RunOptions = PLAIN,
    fault: FaultRule | None = None,
) -> Generated:
    applied: list[AppliedOptions] = []

    def on_step_end(
        running: DiffusionPipeline, index: int, timestep: Any, tensors: dict[str, Any]
    ) -> dict[str, Any]:
        step = index + 1
        latents = tensors["latents"]
        if not applied:
            applied.append(_applied(running, latents))
        if fault is not None and fault.at_step == step:
            latents = _strike(fault, latents)
        # Half precision overflows into NaN on some models; decoding them gives noise or black.
        if torch.isnan(latents).any():
            raise InvalidOutput("nan_latents", options.full_precision)
        # The pipeline's own count: second-order schedulers call back more often than `spec.steps`.
        on_step(step, running.num_timesteps)
        # After the report, so the step a cancel names is always one the job's progress showed.
        if cancel.is_set():
            raise Cancelled(step)
        return {"latents": latents}

    if cancel.is_set():
        raise Cancelled(0)
    seeds = spec.image_seeds()
    with _run_options(pipe, options), torch.inference_mode():
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
            callback_on_step_end_tensor_inputs=["latents"],
            output_type="pil",
        )
    images: list[PILImage] = list(output.images)
    if fault is not None and fault.kind == "black":
        images = [PILImageModule.new("RGB", image.size) for image in images]
    # getbbox() is the box of non-zero pixels: None when every channel of every pixel is 0.
    if any(image.convert("RGB").getbbox() is None for image in images):
        raise InvalidOutput("black_image", options.full_precision)
    return Generated(
        [encode(image, seed) for image, seed in zip(images, seeds, strict=True)],
        applied[0] if applied else _applied(pipe, None),
    )


def encode(image: PILImage, seed: int) -> Image:
    # PIL writes no timestamp or metadata unless asked, so equal pixels give equal bytes.
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    png = buffer.getvalue()
    return Image(png, hashlib.sha256(png).hexdigest(), seed, image.width, image.height)


@contextmanager
def _run_options(pipe: DiffusionPipeline, options: RunOptions) -> Iterator[None]:
    """Turns the options on for one run; the pipeline object serves the next run as it was."""
    dtype = pipe.dtype
    if options.full_precision and dtype != torch.float32:
        pipe.to(torch.float32)
    if options.memory_savers:
        pipe.enable_attention_slicing()
        pipe.vae.enable_tiling()
    try:
        yield
    finally:
        if options.memory_savers:
            pipe.disable_attention_slicing()
            pipe.vae.disable_tiling()
        if pipe.dtype != dtype:
            pipe.to(dtype)


def _applied(pipe: DiffusionPipeline, latents: torch.Tensor | None) -> AppliedOptions:
    processors = pipe.unet.attn_processors.values() if hasattr(pipe, "unet") else []
    return AppliedOptions(
        attention_slicing=any(type(p).__name__ == "SlicedAttnProcessor" for p in processors),
        vae_tiling=bool(getattr(pipe.vae, "use_tiling", False)),
        dtype=str(latents.dtype if latents is not None else pipe.dtype).removeprefix("torch."),
    )


def _strike(fault: FaultRule, latents: torch.Tensor) -> torch.Tensor:
    if fault.kind == "oom":
        raise torch.OutOfMemoryError(oom_message(fault.vram_needed_bytes))
    if fault.kind == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault.kind == "hang":
        threading.Event().wait()
    if fault.kind == "nan":
        return torch.full_like(latents, float("nan"))
    return latents
