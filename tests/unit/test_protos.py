"""The committed stubs match the protos, and the protos pass `buf lint` (STANDARD)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)


def test_committed_stubs_are_fresh(repo_root: Path) -> None:
    result = subprocess.run(
        [sys.executable, "tools/gen_protos.py", "--check"], cwd=repo_root, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_passes(repo_root: Path) -> None:
    buf = repo_root / "node_modules" / ".bin" / "buf"
    assert buf.exists(), "run `make deps` (npm ci) to install buf"
    subprocess.run([sys.executable, "tools/gen_protos.py", "--deps-only"], cwd=repo_root, check=True)
    result = subprocess.run([str(buf), "lint"], cwd=repo_root, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_buf_lint_would_catch_a_violation(repo_root: Path, tmp_path: Path) -> None:
    """Guards against a lint config that silently checks nothing."""
    bad = repo_root / "protos" / "kiln" / "v1" / "zz_lint_probe.proto"
    bad.write_text('syntax = "proto3";\npackage kiln.v1;\nmessage lower_case_message {}\n')
    try:
        result = subprocess.run(
            [str(repo_root / "node_modules/.bin/buf"), "lint"], cwd=repo_root, capture_output=True, text=True
        )
    finally:
        bad.unlink()
    assert result.returncode != 0
    assert "lower_case_message" in result.stdout
