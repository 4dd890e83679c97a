"""Turning a catalog entry into a ready pipeline: the built-in tiny-sd, or a diffusers directory."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoPipelineForText2Image, DiffusionPipeline

from libs.catalog import BUILTIN_TINY_SD, ModelSpec
from services.gpu_worker.runner import ModelLoadError
from services.gpu_worker.tiny_sd import build_tiny_sd


def load_pipeline(spec: ModelSpec, device: str) -> DiffusionPipeline:
    """The pipeline for `spec` on `device`; raises `ModelLoadError` naming the model and its source."""
    builtin = spec.source == BUILTIN_TINY_SD
    if not builtin and not Path(spec.source).is_dir():
        raise ModelLoadError(spec.name, f"model {spec.name!r}: {spec.source} is not a directory")
    try:
        pipe = build_tiny_sd(device) if builtin else _from_directory(Path(spec.source), device)
    except Exception as exc:
        # Loaders fail in many ways (OSError, ValueError, safetensors and JSON errors, CUDA OOM); the
        # job only needs to know which model failed and why, in one line.
        lines = str(exc).strip().splitlines()
        reason = lines[0][:300] if lines else type(exc).__name__
        raise ModelLoadError(spec.name, f"model {spec.name!r}: cannot load {spec.source}: {reason}") from exc
    # Progress goes to the job's events, not to a tqdm bar on the worker's stderr.
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _from_directory(path: Path, device: str) -> DiffusionPipeline:
    # Only safetensors: a pickled .bin checkpoint can run arbitrary code when loaded.
    pipe = AutoPipelineForText2Image.from_pretrained(path, local_files_only=True, use_safetensors=True)
    # The worker returns images as the model draws them; a checker would swap flagged ones for black.
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    # Half precision on a GPU, as models are served; a run asks for float32 when fp16 overflows.
    return pipe.to(device, torch.float16 if device == "cuda" else torch.float32)
