"""The radio impairment model's data (data/radio_links.yaml, each figure with its source):
read by the topology loader (to check a device's jitter against its delay) and by the
impairment model (model/impairments.py). Pure."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["RadioLinkParams", "load_radio_link_params"]


class RadioLinkParams(BaseModel):
    """The radio impairment model's data (data/radio_links.yaml, each figure with its source)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bler_target: float = Field(gt=0, lt=1)
    harq_rtt_ms: float = Field(ge=0)
    max_transmissions: int = Field(ge=1, le=32)
    min_snr_db: float
    base_delay_ms: dict[Literal["up", "down"], float]
    sources: dict[str, str]


@lru_cache(maxsize=1)
def load_radio_link_params() -> RadioLinkParams:
    text = resources.files("testbed").joinpath("data/radio_links.yaml").read_text()
    return RadioLinkParams(**yaml.safe_load(text))
