"""What a job costs, in compute units (CU), computed on the server from validated parameters.

One CU is about one 512x512, 25-step image on the reference model; cost grows linearly with pixels,
steps and images, times the model's `cost_factor`, rounded up, and is never below 1:

    cu = max(1, ceil(cost_factor * (width * height / 512²) * (steps / 25) * num_images))

So one 2048x2048 image (16x the pixels of 512x512) costs more than ten 256x256 ones.
"""

from __future__ import annotations

import math

from libs.jobs import TextToImage

REFERENCE_PIXELS = 512 * 512
REFERENCE_STEPS = 25


def compute_units(spec: TextToImage, cost_factor: float) -> int:
    raw = cost_factor * (spec.width * spec.height / REFERENCE_PIXELS) * (spec.steps / REFERENCE_STEPS)
    # The epsilon keeps exact products (2.0000000001 from float error) from rounding up a unit.
    return max(1, math.ceil(raw * spec.num_images - 1e-9))
