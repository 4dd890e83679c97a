from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import threading
from pathlib import Path
from typing import Any

import pytest
from PIL import Image as PILImage

from libs.catalog import TINY_SD, ModelSpec
from libs.jobs import TextToImage
from services.gpu_worker import thread_runner
from services.gpu_worker.loader import load_pipeline
from services.gpu_worker.runner import Cancelled, Image, ModelLoadError
from services.gpu_worker.thread_runner import ThreadRunner, detect_device
from services.gpu_worker.tiny_sd import build_tiny_sd

MODEL = "tiny-sd"
_BASE = TextToImage(
    prompt="a red fox in the snow",
    negative_prompt="",
    width=64,
    height=64,
    steps=4,
    guidance_scale=7.5,
    seed=42,
    num_images=1,
)


def _spec(**changes: Any) -> TextToImage:
    return dataclasses.replace(_BASE, **changes)


def _runner(slots: int = 1, **models: ModelSpec) -> ThreadRunner:
    return ThreadRunner({MODEL: TINY_SD, **models}, "cpu", slots)


def _ignore(step: int, total: int) -> None:
    pass


async def _run(runner: ThreadRunner, spec: TextToImage, model: str = MODEL) -> list[Image]:
    return await runner.run(model, spec, _ignore, threading.Event())


def _saved_model(tmp_path: Path) -> ModelSpec:
    directory = tmp_path / "tiny-sd-copy"
    build_tiny_sd().save_pretrained(directory)
    return TINY_SD.model_copy(update={"name": "disk", "source": str(directory)})


def test_detect_device_names_a_torch_device() -> None:
    assert detect_device() in ("cpu", "cuda")


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_same_seed_gives_identical_png_across_runs_and_pipelines() -> None:
    runner = _runner()
    first, again = await _run(runner, _BASE), await _run(runner, _BASE)
    rebuilt = await _run(_runner(), _BASE)
    assert first == again == rebuilt
    image = first[0]
    assert image.png.startswith(b"\x89PNG\r\n\x1a\n")
    assert image.sha256 == hashlib.sha256(image.png).hexdigest()
    assert (image.seed, image.width, image.height) == (42, 64, 64)


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_different_seed_or_negative_prompt_gives_different_png() -> None:
    runner = _runner()
    base = (await _run(runner, _BASE))[0].png
    assert (await _run(runner, _spec(seed=43)))[0].png != base
    assert (await _run(runner, _spec(negative_prompt="blurry")))[0].png != base


@pytest.mark.asyncio
@pytest.mark.timeout(60)
@pytest.mark.parametrize(("width", "height"), [(64, 64), (128, 64)])
async def test_png_is_rgb_at_the_requested_size(width: int, height: int) -> None:
    [image] = await _run(_runner(), _spec(width=width, height=height))
    decoded = PILImage.open(io.BytesIO(image.png))
    assert (decoded.format, decoded.mode, decoded.size) == ("PNG", "RGB", (width, height))
    assert (image.width, image.height) == (width, height)


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_progress_reports_every_step_in_order() -> None:
    steps: list[tuple[int, int]] = []
    await _runner().run(MODEL, _spec(steps=5), lambda i, n: steps.append((i, n)), threading.Event())
    assert steps == [(i, 5) for i in range(1, 6)]


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_cancel_mid_run_stops_before_decoding() -> None:
    runner = _runner()
    await runner.load(MODEL)
    decodes: list[object] = []
    hook = runner._idle[MODEL][0].vae.decoder.register_forward_hook(lambda *_: decodes.append(1))
    cancel = threading.Event()
    steps: list[int] = []

    def on_step(step: int, total: int) -> None:
        steps.append(step)
        if step == 2:
            cancel.set()

    try:
        with pytest.raises(Cancelled) as raised:
            await runner.run(MODEL, _spec(steps=20), on_step, cancel)
    finally:
        hook.remove()
    assert raised.value.step == 2
    assert steps == [1, 2]
    assert decodes == []


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_cancel_before_start_runs_nothing() -> None:
    cancel = threading.Event()
    cancel.set()
    steps: list[int] = []
    with pytest.raises(Cancelled) as raised:
        await _runner().run(MODEL, _BASE, lambda i, n: steps.append(i), cancel)
    assert (raised.value.step, steps) == (0, [])


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_runner_is_reusable_after_a_cancel() -> None:
    runner = _runner()
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        await runner.run(MODEL, _BASE, _ignore, cancel)
    assert await _run(runner, _BASE) == await _run(_runner(), _BASE)


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_each_image_of_a_batch_is_reproducible_from_its_own_seed() -> None:
    runner = _runner()
    batch = await _run(runner, _spec(seed=100, num_images=2))
    alone = await _run(runner, _spec(seed=101))
    assert [image.seed for image in batch] == [100, 101]
    assert batch[0].png != batch[1].png
    assert batch[1] == alone[0]


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_concurrent_runs_overlap_and_match_sequential_runs() -> None:
    runner = _runner(slots=2)
    specs = [_spec(seed=1, steps=6), _spec(seed=2, steps=6)]
    expected = [await _run(runner, spec) for spec in specs]
    # Both runs must reach step 1 before either may go on, which only works if they run at once.
    meet = threading.Barrier(2, timeout=20)

    def on_step(step: int, total: int) -> None:
        if step == 1:
            meet.wait()

    results = await asyncio.gather(*(runner.run(MODEL, spec, on_step, threading.Event()) for spec in specs))
    assert list(results) == expected


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_abandoned_run_keeps_its_pipeline_until_its_thread_ends() -> None:
    runner = _runner(slots=1)
    await runner.load(MODEL)
    gate, started = threading.Event(), threading.Event()

    def hold_at_first_step(step: int, total: int) -> None:
        started.set()
        gate.wait(timeout=20)

    abandoned = asyncio.create_task(runner.run(MODEL, _BASE, hold_at_first_step, threading.Event()))
    await asyncio.to_thread(started.wait, 20)
    abandoned.cancel()
    next_steps: list[int] = []
    follower = asyncio.create_task(
        runner.run(MODEL, _BASE, lambda i, n: next_steps.append(i), threading.Event())
    )
    await asyncio.sleep(0.3)
    assert next_steps == []  # the only pipeline is still in the abandoned run's thread
    gate.set()
    assert await follower == await _run(_runner(), _BASE)
    with pytest.raises(asyncio.CancelledError):
        await abandoned


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_concurrent_loads_load_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def counting_load(spec: ModelSpec, device: str) -> object:
        calls.append(spec.name)
        return load_pipeline(spec, device)

    monkeypatch.setattr(thread_runner, "load_pipeline", counting_load)
    runner = _runner(slots=2)
    await asyncio.gather(runner.load(MODEL), runner.load(MODEL), _run(runner, _BASE))
    await runner.load(MODEL)
    assert calls == [MODEL]


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_event_loop_keeps_running_during_a_run() -> None:
    runner = _runner()
    await runner.load(MODEL)
    ticks = 0
    done = asyncio.Event()

    async def tick() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    ticker = asyncio.create_task(tick())
    await _run(runner, _spec(steps=20))
    done.set()
    await ticker
    assert ticks >= 5


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_unicode_and_overlong_prompts() -> None:
    runner = _runner()
    family = "\U0001f469\u200d\U0001f469\u200d\U0001f467"
    [image] = await _run(runner, _spec(prompt=f"🦊 狐狸 {family} 雪の中", negative_prompt="😶‍🌫️ ぼやけ"))
    assert PILImage.open(io.BytesIO(image.png)).size == (64, 64)
    # Past 77 tokens the prompt is truncated, so what follows cannot change the image.
    long_prompt = "a red fox " * 1000
    [long_image] = await _run(runner, _spec(prompt=long_prompt))
    [longer_image] = await _run(runner, _spec(prompt=long_prompt + "on the moon"))
    assert len(long_prompt) == 10_000
    assert long_image.png == longer_image.png


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_saved_model_directory_gives_identical_png(tmp_path: Path) -> None:
    disk = _saved_model(tmp_path)
    runner = _runner(disk=disk)
    assert await _run(runner, _BASE, "disk") == await _run(runner, _BASE, MODEL)


@pytest.mark.timeout(60)
def test_load_of_missing_directory_names_model_and_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    spec = TINY_SD.model_copy(update={"name": "ghost", "source": str(missing)})
    with pytest.raises(ModelLoadError, match=rf"'ghost'.*{missing}"):
        load_pipeline(spec, "cpu")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("damaged", ["unet/diffusion_pytorch_model.safetensors", "unet/config.json"])
def test_load_of_damaged_directory_names_model_and_path(tmp_path: Path, damaged: str) -> None:
    spec = _saved_model(tmp_path)
    (Path(spec.source) / damaged).write_bytes(b"\x00 not what it claims to be")
    with pytest.raises(ModelLoadError, match=rf"'disk'.*{spec.source}") as raised:
        load_pipeline(spec, "cpu")
    assert "\n" not in str(raised.value)


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_runner_load_errors_are_model_load_errors(tmp_path: Path) -> None:
    ghost = TINY_SD.model_copy(update={"name": "ghost", "source": str(tmp_path / "nowhere")})
    runner = _runner(ghost=ghost)
    with pytest.raises(ModelLoadError, match="ghost"):
        await runner.load("ghost")
    with pytest.raises(ModelLoadError, match="not in the catalog"):
        await runner.run("unknown", _BASE, _ignore, threading.Event())
