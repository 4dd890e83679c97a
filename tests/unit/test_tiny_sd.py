from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from libs.catalog import TINY_SD
from services.gpu_worker.tiny_sd import MAX_TOKENS, SIZE_MULTIPLE, build_tiny_sd

_ZWJ_FAMILY = "\U0001f469\u200d\U0001f469\u200d\U0001f467"


def _pixels(seed: int, prompt: str = "a red fox", size: int = 64) -> np.ndarray:
    pipe = build_tiny_sd()
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        image = pipe(
            prompt,
            width=size,
            height=size,
            num_inference_steps=4,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0]
    return np.asarray(image, dtype=np.float64)


@pytest.mark.timeout(60)
def test_size_multiple_matches_catalog_and_pipeline() -> None:
    pipe = build_tiny_sd()
    derived = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    assert SIZE_MULTIPLE == derived == TINY_SD.size_multiple == 16


@pytest.mark.timeout(60)
def test_build_is_fast_and_leaves_global_rng_alone() -> None:
    build_tiny_sd()  # first build pays one-off import and allocator costs
    before = torch.random.get_rng_state()
    start = time.perf_counter()
    build_tiny_sd()
    elapsed = time.perf_counter() - start
    assert torch.equal(torch.random.get_rng_state(), before)
    assert elapsed < 1.0  # about 0.04 s on a 2-core CPU; loose so a busy machine does not flake


@pytest.mark.timeout(60)
def test_weights_are_identical_across_builds() -> None:
    first, second = build_tiny_sd(), build_tiny_sd()
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(first, name).state_dict(), getattr(second, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.timeout(60)
def test_same_image_in_a_fresh_process() -> None:
    script = (
        "import hashlib, torch\n"
        "from services.gpu_worker.tiny_sd import build_tiny_sd\n"
        "pipe = build_tiny_sd()\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "with torch.inference_mode():\n"
        "    image = pipe('a red fox', width=64, height=64, num_inference_steps=4,\n"
        "                 generator=torch.Generator('cpu').manual_seed(7)).images[0]\n"
        "print(hashlib.sha256(image.tobytes()).hexdigest())\n"
    )
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    pixels = _pixels(7).astype(np.uint8)
    assert child.stdout.strip() == hashlib.sha256(pixels.tobytes()).hexdigest()


@pytest.mark.timeout(60)
def test_images_have_structure_and_depend_on_the_seed() -> None:
    a, b = _pixels(1), _pixels(2)
    assert a.std() > 20  # not one flat colour
    assert np.abs(a - b).mean() > 20  # a new seed gives a clearly different picture


@pytest.mark.timeout(60)
def test_tokenizer_round_trips_any_unicode() -> None:
    tokenizer = build_tiny_sd().tokenizer
    text = f"fox 狐狸 🦊 {_ZWJ_FAMILY} e\u0301"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.timeout(60)
def test_tokenizer_truncates_to_clip_length() -> None:
    tokenizer = build_tiny_sd().tokenizer
    ids = tokenizer("狐" * 10_000, padding="max_length", truncation=True).input_ids
    assert len(ids) == MAX_TOKENS
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id


@pytest.mark.timeout(60)
def test_output_is_rgb_at_the_requested_size() -> None:
    pipe = build_tiny_sd()
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        image = pipe("x", width=128, height=64, num_inference_steps=2).images[0]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    decoded = Image.open(io.BytesIO(buffer.getvalue()))
    assert (decoded.mode, decoded.size) == ("RGB", (128, 64))
