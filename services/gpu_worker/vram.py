"""How much GPU memory there is: the seam between the worker and the hardware's reading of it.

Readings are taken in the child process that runs the pipelines, never in the worker itself, so the
worker never creates a CUDA context of its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_TRIED = re.compile(r"Tried to allocate ([0-9]+(?:\.[0-9]+)?) (B|KiB|MiB|GiB|TiB)")


class VramProbe(Protocol):
    def total_bytes(self) -> int: ...

    def free_bytes(self) -> int: ...


class TorchVramProbe:
    """The real reading, from the CUDA driver; 0/0 where there is no GPU."""

    def total_bytes(self) -> int:
        return self._info()[1]

    def free_bytes(self) -> int:
        return self._info()[0]

    @staticmethod
    def _info() -> tuple[int, int]:
        import torch  # only where the pipelines run

        if not torch.cuda.is_available():
            return 0, 0
        free, total = torch.cuda.mem_get_info()
        return free, total


@dataclass(frozen=True)
class FixedVramProbe:
    """The hardware-edge fake: a GPU whose memory reads the same figures every time."""

    total: int
    free: int

    def total_bytes(self) -> int:
        return self.total

    def free_bytes(self) -> int:
        return self.free


def probe_for(fake_total_bytes: int, fake_free_bytes: int) -> VramProbe:
    """The fake when the worker's settings configure one (either figure > 0), else the real probe."""
    if fake_total_bytes > 0 or fake_free_bytes > 0:
        return FixedVramProbe(fake_total_bytes, fake_free_bytes)
    return TorchVramProbe()


def needed_bytes(oom_message: str) -> int:
    """The size of the allocation that failed, from torch's "Tried to allocate 2.00 GiB"; 0 if absent."""
    found = _TRIED.search(oom_message)
    if found is None:
        return 0
    return round(float(found.group(1)) * _UNITS[found.group(2)])
