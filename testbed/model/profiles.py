"""Hardware profiles of emulated nodes (data in `data/profiles.yaml`) and model sizes.

Pure data. A profile gives per-step denoising time by resolution and precision, compute
and radio power, and the cgroup limits its emulated node runs under; optionally its share
of the host's GPU (`gpu_share_pct`, applied through CUDA MPS where a GPU is) and per-step
times measured on a GPU at that share (`gpu_step_s`, empty until measured).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["PRECISIONS", "Profile", "load_profiles", "step_time_s", "gpu_step_time_s", "SD15_UNET_PARAMS",
           "model_size_bytes"]

#: Precision variants of every local model, most to least precise.
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")

#: Parameters of the SD1.5 UNet (diffusers UNet2DConditionModel, stable-diffusion-v1-5).
SD15_UNET_PARAMS = 859_520_964

_BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: Literal["device", "server"]
    description: str
    cpu_cores: float = Field(gt=0)
    memory_mb: int = Field(gt=0)
    compute_power_w: float = Field(gt=0)
    radio_tx_power_w: float = Field(ge=0)
    radio_rx_power_w: float = Field(ge=0)
    step_time_s: dict[int, dict[str, float]]
    sources: dict[str, str]
    #: Share of the host GPU's threads its processes may use (CUDA MPS active-thread %).
    gpu_share_pct: int | None = Field(None, ge=1, le=100)
    #: Measured seconds per denoising step on the host GPU at `gpu_share_pct`, by model
    #: (e.g. "tiny", "sd15": SD1.5-sized UNet, CFG batch 2 at 512 px) and precision
    #: (bench/gpu.py); `sources.gpu_step_s` names the GPU, the date and the settings.
    gpu_step_s: dict[str, dict[str, float]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _gpu_step_s_is_measured(self) -> Profile:
        for model, times in self.gpu_step_s.items():
            for precision, seconds in times.items():
                if precision not in PRECISIONS:
                    raise ValueError(f"gpu_step_s.{model}.{precision}: unknown precision; use one of "
                                     f"{', '.join(PRECISIONS)} (bf16 is fp16)")
                if not seconds > 0:
                    raise ValueError(f"gpu_step_s.{model}.{precision}: {seconds} s is not a time > 0")
        if self.gpu_step_s and self.gpu_share_pct is None:
            raise ValueError("gpu_step_s is measured at the profile's GPU share: set gpu_share_pct too")
        if self.gpu_step_s and "gpu_step_s" not in self.sources:
            raise ValueError("gpu_step_s needs sources.gpu_step_s: the GPU, the date and how it was measured")
        return self


@lru_cache(maxsize=4)
def load_profiles(path: str | None = None) -> dict[str, Profile]:
    """All profiles by name; the packaged data file unless `path` names another."""
    text = Path(path).read_text() if path else resources.files("testbed").joinpath("data/profiles.yaml").read_text()
    data = yaml.safe_load(text)
    return {name: Profile(name=name, **body) for name, body in data.items()}


def step_time_s(profile: Profile, resolution_px: int, precision: str) -> float:
    """Seconds per SD1.5 denoising step on this hardware (profile data; see its sources)."""
    try:
        return profile.step_time_s[resolution_px][precision]
    except KeyError:
        raise KeyError(
            f"profile {profile.name!r} has no step time for {resolution_px} px {precision}"
        ) from None


def gpu_step_time_s(profile: Profile, model: str, precision: str) -> float | None:
    """Measured seconds per step of `model` at `precision` on the host GPU at the profile's
    share; None where nothing was measured (the profile's `step_time_s` still holds)."""
    return profile.gpu_step_s.get(model, {}).get(precision)


def model_size_bytes(precision: str, params: int = SD15_UNET_PARAMS) -> int:
    """Weight bytes of a model variant: parameters x bits (per-channel scales add < 0.1 %).

    The diffusion workload reports the true size of variants it builds; this is the
    figure for SD1.5 when only its parameter count is known.
    """
    return params * _BITS[precision] // 8
