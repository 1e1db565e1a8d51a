"""A plan's stage predictions as distributions, made on demand and kept. Pure.

`StageModel` holds what `stochastic.stage_distributions` needs for one cell as a plan sees
it — the topology, the devices' links and point costs, the live impairments, how many runs
each agent's connection has carried, the delay path's per-pass cost and the seed — and
builds a device's stage distribution the first time anyone asks for it: a chance-
constrained selection asks for every candidate, a mean-based plan only for its chain (and a
recovery for the devices it picks), so a plan on 20 lossy links does not pay for 20
simulations it never reads. Draws are deterministic per device and seed whatever the order
of the requests (stochastic.py keys each stage's draws by its device id).

What a stage record and result.json carry comes from here: `predicted(dev)` (the means,
today's keys, plus `quantiles_s` and the stage latency's `latency_quantiles_s`),
`run(devices)` (a chain's latency, draws summed) and `tail_s(dev)` (the stage deadline's
high quantile).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from testbed.model.impairments import LinkImpairment
from testbed.model.radio import DeviceLink
from testbed.model.topology import Topology
from testbed.selection.costs import DeviceCost
from testbed.selection.stochastic import (
    RUN_QUANTILES,
    STAGE_QUANTILES,
    Distribution,
    StageDistribution,
    run_distribution,
    stage_distributions,
)

__all__ = ["DEADLINE_QUANTILE", "StageModel"]

#: The stage deadline waits at least for this quantile of the stage's modelled latency: a
#: warm lossy connection's tail is several times the point model's stage time, which
#: 2 x the point time + 2 s used to cut (docs/links.md).
DEADLINE_QUANTILE = 0.999


@dataclass
class StageModel:
    """Stage distributions of one plan's candidates (module docstring)."""

    topology: Topology
    links: list[DeviceLink]
    costs: list[DeviceCost]
    impairments: Mapping[str, LinkImpairment] = field(default_factory=dict)
    messages_before: Mapping[str, int] = field(default_factory=dict)
    per_pass_s: float = 0.0
    seed: int = 0
    build_ms: float = 0.0  # time spent building distributions so far
    _stages: dict[str, StageDistribution] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._links = {lk.id: lk for lk in self.links}
        self._costs = {c.id: c for c in self.costs}

    def stages(self, devices: Iterable[str]) -> list[StageDistribution]:
        """The devices' stage distributions, in the given order (built once each)."""
        ids = list(devices)
        missing = [d for d in dict.fromkeys(ids) if d not in self._stages]
        unknown = [d for d in missing if d not in self._costs or d not in self._links]
        if unknown:
            raise KeyError(f"no link or cost for {unknown}")
        if missing:
            t0 = time.perf_counter()
            built = stage_distributions(self.topology, [self._links[d] for d in missing],
                                        costs=[self._costs[d] for d in missing], impairments=self.impairments,
                                        messages_before=dict(self.messages_before), per_pass_s=self.per_pass_s,
                                        seed=self.seed)
            self._stages.update({s.id: s for s in built})
            self.build_ms += (time.perf_counter() - t0) * 1e3
        return [self._stages[d] for d in ids]

    def stage(self, device: str) -> StageDistribution:
        return self.stages([device])[0]

    def run(self, devices: Iterable[str]) -> Distribution:
        """A chain's latency: its stages' draws summed (never their quantiles). Each stage's
        draws are in an order of their own already (stochastic.stage_distributions), and
        summed as they are they are the very sums chance.select_chance judged the plan on."""
        stages = self.stages(devices)
        if not stages:
            return Distribution.point(0.0)
        if all(s.latency.is_point for s in stages):
            return run_distribution(stages, self.seed)  # the point model's float sums, exactly
        return Distribution(np.sum([s.latency.samples for s in stages], axis=0))

    def run_quantiles(self, devices: Iterable[str]) -> dict[str, float]:
        """result.json's `predicted_latency_quantiles_s`: {"p10", "p50", "p90", "p95"}."""
        return self.run(devices).quantiles(RUN_QUANTILES)

    def mean_s(self, devices: Iterable[str]) -> float:
        """A chain's mean latency (the point model's sum on lossless links)."""
        return self.run(devices).mean()

    def predicted(self, device: str) -> dict[str, Any]:
        """A stage record's `predicted`: the means under today's keys, the transfers'
        quantiles (`quantiles_s`, pinned by issue 23) and the stage latency's."""
        s = self.stage(device)
        return {"t_down_s": s.t_down.mean(), "t_cmp_s": s.cost.t_cmp_s, "t_up_s": s.t_up.mean(),
                "energy_j": s.cost.energy_j, "quantiles_s": s.quantiles_record(),
                "latency_quantiles_s": s.latency.quantiles(STAGE_QUANTILES)}

    def tail_s(self, device: str, q: float = DEADLINE_QUANTILE) -> float:
        """The q-quantile of the device's stage latency (what its stage deadline waits for at least)."""
        return float(self.stage(device).latency.quantile(q))
