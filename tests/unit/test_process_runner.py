"""`ProcessRunner` with the real tiny-sd pipeline in real child processes."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image as PILImage

from libs.catalog import TINY_SD, ModelSpec
from libs.jobs import TextToImage
from services.gpu_worker.app import detect_device
from services.gpu_worker.generate import generate
from services.gpu_worker.loader import load_pipeline
from services.gpu_worker.process_runner import ProcessRunner
from services.gpu_worker.runner import Cancelled, Generated, Image, ModelLoadError
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


def _ignore(step: int, total: int) -> None:
    pass


def _saved_model(directory: Path) -> ModelSpec:
    build_tiny_sd().save_pretrained(directory)
    return TINY_SD.model_copy(update={"name": "disk", "source": str(directory)})


def in_process(spec: TextToImage) -> list[Image]:
    """What the same generate function gives in this process, with a pipeline built here."""
    pipe = load_pipeline(TINY_SD, "cpu")
    return generate(pipe, spec, _ignore, threading.Event()).images


@pytest.fixture(scope="module")
async def runner(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ProcessRunner]:
    disk = _saved_model(tmp_path_factory.mktemp("models") / "disk")
    ghost = TINY_SD.model_copy(update={"source": str(tmp_path_factory.mktemp("empty") / "nowhere")})
    runner = ProcessRunner({MODEL: TINY_SD, "disk": disk, "ghost": ghost}, "cpu", 2, [MODEL, "disk", "ghost"])
    await runner.start()
    yield runner
    await runner.close()


async def _run(runner: ProcessRunner, spec: TextToImage, model: str = MODEL) -> list[Image]:
    return (await runner.run(model, spec, _ignore, asyncio.Event())).images


def test_detect_device_names_a_torch_device() -> None:
    assert detect_device() in ("cpu", "cuda")


@pytest.mark.timeout(60)
async def test_runner_has_one_child_per_slot_and_reports_its_models(runner: ProcessRunner) -> None:
    pids = runner.child_pids()
    assert len(pids) == len(set(pids)) == 2
    states = runner.models()
    assert states.ready == [MODEL, "disk"]
    assert list(states.failed) == ["ghost"]
    assert states.failed["ghost"].startswith("model 'ghost': ")
    assert runner.vram().total_bytes == runner.vram().free_bytes == 0  # no GPU here


@pytest.mark.timeout(60)
async def test_same_seed_gives_identical_png_across_runs_children_and_this_process(
    runner: ProcessRunner,
) -> None:
    first, again = await _run(runner, _BASE), await _run(runner, _BASE)
    assert first == again == in_process(_BASE)
    image = first[0]
    assert image.png.startswith(b"\x89PNG\r\n\x1a\n")
    assert image.sha256 == hashlib.sha256(image.png).hexdigest()
    assert (image.seed, image.width, image.height) == (42, 64, 64)


@pytest.mark.timeout(60)
async def test_different_seed_or_negative_prompt_gives_different_png(runner: ProcessRunner) -> None:
    base = (await _run(runner, _BASE))[0].png
    assert (await _run(runner, _spec(seed=43)))[0].png != base
    assert (await _run(runner, _spec(negative_prompt="blurry")))[0].png != base


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("width", "height"), [(64, 64), (128, 64)])
async def test_png_is_rgb_at_the_requested_size(runner: ProcessRunner, width: int, height: int) -> None:
    [image] = await _run(runner, _spec(width=width, height=height))
    decoded = PILImage.open(io.BytesIO(image.png))
    assert (decoded.format, decoded.mode, decoded.size) == ("PNG", "RGB", (width, height))
    assert (image.width, image.height) == (width, height)


@pytest.mark.timeout(60)
async def test_progress_reports_every_step_in_order(runner: ProcessRunner) -> None:
    steps: list[tuple[int, int]] = []
    await runner.run(MODEL, _spec(steps=5), lambda i, n: steps.append((i, n)), asyncio.Event())
    assert steps == [(i, 5) for i in range(1, 6)]


@pytest.mark.timeout(60)
async def test_cancel_mid_run_stops_at_the_step_the_child_had_reached(runner: ProcessRunner) -> None:
    cancel = asyncio.Event()
    steps: list[int] = []

    def on_step(step: int, total: int) -> None:
        steps.append(step)
        if step == 2:
            cancel.set()

    with pytest.raises(Cancelled) as raised:
        await runner.run(MODEL, _spec(steps=150), on_step, cancel)
    # The child runs on while the cancel crosses the pipe, so it lands a few steps later: at the last
    # step it reported, far from the end.
    assert 2 <= raised.value.step < 150
    assert steps == list(range(1, raised.value.step + 1))


@pytest.mark.timeout(60)
async def test_cancel_before_start_runs_nothing(runner: ProcessRunner) -> None:
    cancel = asyncio.Event()
    cancel.set()
    steps: list[int] = []
    with pytest.raises(Cancelled) as raised:
        await runner.run(MODEL, _BASE, lambda i, n: steps.append(i), cancel)
    assert (raised.value.step, steps) == (0, [])


@pytest.mark.timeout(60)
async def test_runner_is_reusable_after_a_cancel_with_the_same_children(runner: ProcessRunner) -> None:
    pids = runner.child_pids()
    cancel = asyncio.Event()
    with pytest.raises(Cancelled):
        await runner.run(MODEL, _spec(steps=150), lambda i, n: cancel.set(), cancel)
    assert await _run(runner, _BASE) == in_process(_BASE)
    assert runner.child_pids() == pids


@pytest.mark.timeout(60)
async def test_each_image_of_a_batch_is_reproducible_from_its_own_seed(runner: ProcessRunner) -> None:
    batch = await _run(runner, _spec(seed=100, num_images=2))
    alone = await _run(runner, _spec(seed=101))
    assert [image.seed for image in batch] == [100, 101]
    assert batch[0].png != batch[1].png
    assert batch[1] == alone[0]


@pytest.mark.timeout(60)
async def test_concurrent_runs_overlap_in_two_children_and_match_sequential_runs(
    runner: ProcessRunner,
) -> None:
    specs = [_spec(seed=1, steps=40), _spec(seed=2, steps=40)]
    expected = [await _run(runner, spec) for spec in specs]
    order: list[tuple[int, int]] = []

    async def run(index: int) -> Generated:
        return await runner.run(MODEL, specs[index], lambda i, n: order.append((index, i)), asyncio.Event())

    results = await asyncio.gather(run(0), run(1))
    assert [r.images for r in results] == expected
    # Each started before the other finished: they ran at the same time, one per child.
    assert order.index((1, 1)) < order.index((0, 40))
    assert order.index((0, 1)) < order.index((1, 40))


@pytest.mark.timeout(60)
async def test_a_run_whose_caller_goes_away_still_stops_and_frees_its_child(runner: ProcessRunner) -> None:
    pids = runner.child_pids()
    started = asyncio.Event()
    abandoned = asyncio.create_task(
        runner.run(MODEL, _spec(steps=150), lambda i, n: started.set(), asyncio.Event())
    )
    await started.wait()
    abandoned.cancel()
    with pytest.raises(asyncio.CancelledError):
        await abandoned
    # Both slots serve again (the abandoned one once its child stopped), in the same children.
    results = await asyncio.gather(_run(runner, _BASE), _run(runner, _BASE))
    assert list(results) == [in_process(_BASE)] * 2
    assert runner.child_pids() == pids


@pytest.mark.timeout(60)
async def test_event_loop_keeps_running_during_a_run(runner: ProcessRunner) -> None:
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


@pytest.mark.timeout(60)
async def test_unicode_and_overlong_prompts(runner: ProcessRunner) -> None:
    family = "\U0001f469\u200d\U0001f469\u200d\U0001f467"
    [image] = await _run(runner, _spec(prompt=f"🦊 狐狸 {family} 雪の中", negative_prompt="😶‍🌫️ ぼやけ"))
    assert PILImage.open(io.BytesIO(image.png)).size == (64, 64)
    # Past 77 tokens the prompt is truncated, so what follows cannot change the image.
    long_prompt = "a red fox " * 1000
    [long_image] = await _run(runner, _spec(prompt=long_prompt))
    [longer_image] = await _run(runner, _spec(prompt=long_prompt + "on the moon"))
    assert len(long_prompt) == 10_000
    assert long_image.png == longer_image.png


@pytest.mark.timeout(60)
async def test_saved_model_directory_gives_identical_png(runner: ProcessRunner) -> None:
    assert await _run(runner, _BASE, "disk") == await _run(runner, _BASE, MODEL)


@pytest.mark.timeout(60)
async def test_runs_of_models_not_loaded_here_are_model_load_errors(runner: ProcessRunner) -> None:
    with pytest.raises(ModelLoadError, match=r"^model 'ghost': .*nowhere is not a directory$") as raised:
        await _run(runner, _BASE, "ghost")
    assert raised.value.model == "ghost"
    with pytest.raises(ModelLoadError, match=r"^model 'unknown' is not loaded on this worker$"):
        await _run(runner, _BASE, "unknown")


@pytest.mark.timeout(60)
def test_load_of_missing_directory_names_model_and_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    spec = TINY_SD.model_copy(update={"name": "ghost", "source": str(missing)})
    with pytest.raises(ModelLoadError, match=rf"'ghost'.*{missing}"):
        load_pipeline(spec, "cpu")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("damaged", ["unet/diffusion_pytorch_model.safetensors", "unet/config.json"])
def test_load_of_damaged_directory_names_model_and_path(tmp_path: Path, damaged: str) -> None:
    spec = _saved_model(tmp_path / "disk")
    (Path(spec.source) / damaged).write_bytes(b"\x00 not what it claims to be")
    with pytest.raises(ModelLoadError, match=rf"'disk'.*{spec.source}") as raised:
        load_pipeline(spec, "cpu")
    assert "\n" not in str(raised.value)
