"""`kiln up` (what `make run` starts) as separate processes, driven by `kiln generate` and curl-like REST."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from libs.redis_server import free_port
from tests.helpers import png_size

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

KILN = [sys.executable, "-m", "libs.cli.main"]


@pytest.fixture(scope="module")
def devstack(
    tmp_path_factory: pytest.TempPathFactory, repo_root: Path
) -> Iterator[tuple[Path, dict[str, str]]]:
    workdir = tmp_path_factory.mktemp("devstack")
    http, grpc_port, sched = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env["PYTHONPATH"] = str(repo_root)
    proc = subprocess.Popen(
        [
            *KILN,
            "up",
            "--http-port",
            str(http),
            "--grpc-port",
            str(grpc_port),
            "--scheduler-port",
            str(sched),
        ],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    banner = ""
    deadline = time.monotonic() + 150
    while "Ctrl-C" not in banner:
        line = proc.stdout.readline()
        assert line and time.monotonic() < deadline, f"kiln up did not come up: {banner}"
        banner += line
    key = re.search(r"KILN_API_KEY=(\S+)", banner)
    assert key is not None
    info = {"key": key.group(1), "http": f"http://127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc_port}"}
    yield workdir, info
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=30)
    proc.stdout.close()
    assert code == 0


def test_devstack_keeps_redis_private_with_aof(devstack: tuple[Path, dict[str, str]]) -> None:
    workdir, _ = devstack
    assert (workdir / ".kiln" / "redis.url").read_text().startswith("redis://127.0.0.1:")
    assert (workdir / ".kiln" / "redis" / "appendonlydir").is_dir()


def test_generate_cli_saves_the_image(devstack: tuple[Path, dict[str, str]], repo_root: Path) -> None:
    workdir, info = devstack
    out = workdir / "fox.png"
    env = {**os.environ, "KILN_API_KEY": info["key"], "PYTHONPATH": str(repo_root)}
    result = subprocess.run(
        [
            *KILN,
            "generate",
            "a red fox",
            "-o",
            str(out),
            "--server",
            info["grpc"],
            "--width",
            "96",
            "--seed",
            "7",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "step 4/4" in result.stderr
    assert png_size(out.read_bytes()) == (96, 64)


def test_generate_cli_reports_bad_input(devstack: tuple[Path, dict[str, str]], repo_root: Path) -> None:
    _, info = devstack
    env = {**os.environ, "KILN_API_KEY": info["key"], "PYTHONPATH": str(repo_root)}
    result = subprocess.run(
        [*KILN, "generate", "x", "--server", info["grpc"], "--steps", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr
    assert "job.text_to_image.steps: must be between 1 and 150, got 0" in result.stderr


def test_rest_example_from_the_banner(devstack: tuple[Path, dict[str, str]]) -> None:
    _, info = devstack
    body = json.dumps({"model": "tiny-sd", "textToImage": {"prompt": "a red fox", "seed": "7"}}).encode()
    request = urllib.request.Request(
        f"{info['http']}/v1/jobs",
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {info['key']}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        job = json.load(resp)
    assert job["state"] == "STATE_QUEUED"
    deadline = time.monotonic() + 60
    while job["state"] not in ("STATE_SUCCEEDED", "STATE_FAILED"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
        get = urllib.request.Request(
            f"{info['http']}/v1/{job['name']}", headers={"Authorization": f"Bearer {info['key']}"}
        )
        with urllib.request.urlopen(get, timeout=10) as resp:
            job = json.load(resp)
    assert job["state"] == "STATE_SUCCEEDED"
