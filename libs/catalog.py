"""The model catalog: which models exist, where each is loaded from, and what it accepts.

The gateway validates requests against it and the worker loads from it, so both read the same
catalog (the built-in `tiny-sd`, plus any `[models.NAME]` tables of the config file).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

BUILTIN_TINY_SD = "builtin:tiny-sd"


class ModelSpec(BaseModel):
    """One servable model and its request limits.

    `size_multiple` is the VAE's downscale times the UNet's: latents must pass the UNet's
    downsamplers without remainder (8 x 2 for tiny-sd, 8 x 8 for Stable Diffusion 1.x/2.x).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = ""
    source: str = Field(description="'builtin:tiny-sd' or a diffusers directory on disk")
    min_size: int = 64
    max_size: int = 1024
    size_multiple: int = 64
    default_size: int = 512
    max_steps: int = 150
    default_steps: int = 30
    min_guidance: float = 0.0
    max_guidance: float = 30.0
    default_guidance: float = 7.5
    max_num_images: int = 4
    max_prompt_chars: int = 2000
    # Compute units relative to the reference model (SD 1.5 at 512x512, 25 steps = 1 CU).
    cost_factor: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if not (0 < self.min_size <= self.default_size <= self.max_size):
            raise ValueError("need 0 < min_size <= default_size <= max_size")
        for size in (self.min_size, self.default_size, self.max_size):
            if size % self.size_multiple:
                raise ValueError(f"{size} is not a multiple of size_multiple {self.size_multiple}")
        if not (1 <= self.default_steps <= self.max_steps):
            raise ValueError("need 1 <= default_steps <= max_steps")
        return self


TINY_SD = ModelSpec(
    name="tiny-sd",
    source=BUILTIN_TINY_SD,
    min_size=64,
    max_size=1024,
    size_multiple=16,
    default_size=64,
    max_steps=150,
    default_steps=4,
    cost_factor=0.05,
)


def build_catalog(configured: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
    """The built-in models overlaid with the configured ones, each carrying its own name."""
    catalog = {TINY_SD.name: TINY_SD}
    for name, spec in configured.items():
        catalog[name] = spec.model_copy(update={"name": name})
    return catalog
