"""Patch-parallel diffusion under a budget: how many bands, which devices, how many steps.

Pure (no I/O). The paper's spatial collaboration (docs/patch.md): the latent is cut into N
row bands, one per device; each device runs the whole UNet on its band at every step, with
the other bands' context (halo rows, GroupNorm statistics, attention inputs) exchanged
through the edge server. The first `warmup_steps` steps are synchronous (every exchange
point is a round trip through the server); the others are displaced (the context of the
previous step, sent while computing):

    per device i of N, per step (X*8/(r*eta) is the TCP transfer time of selection/transfer.py):
      task down   A_i = payload_bytes * (band + halo rows) / latent rows    (the band, padded)
      noise up    B_i = payload_bytes * band rows / latent rows
      context     U_i up, D_i down: SD1.5's at N bands (CONTEXT_BYTES_FP32, x 1/2 for fp16
                  activations: every precision but fp32, as in split)
      compute     s_N * T_i      (s_N = FLOP_SHARE[N], T_i the profile's SD1.5 step time)

    T(X) = max(max_i X_i*8/(r_i*eta), sum_i X_i*8/(C*eta))   transfers of all N at once: each
                  at its link rate, together at most the cell's capacity C when the cell's air
                  is shared (topology `cell.shared_capacity`), else the first term alone
    c_i         = max(s_N*T_i, h_i)    the band's compute window: the profile's time, or the
                  device's handling of its U_i + D_i when longer (the device half of
                  selection/costs.py handling_s under its CPU quota: in the emulation the model and the
                  messages share that quota)
    t_displaced = T(A) + max(max_i c_i + T(B), T(U) + T(D)) + H
    t_sync      = T(A) + max_i c_i + max(T(U) + T(D), P * SYNC_ROUND_S) + T(B) + H
    t_final     = T(A) + max_i s_N*T_i + T(B)     the last step, displaced: its context has no reader
    energy      = sum_i P_rx,i*(T(A) + T(D)) + P_cmp,i*c_i + P_tx,i*(T(B) + T(U))   (final: U = D = 0,
                  c_i = s_N*T_i)

H = the server's half of handling_s over every band's context bytes (it handles them in turn);
P = the exchange points of the model that runs: its synchronous step makes one round trip
per point, each carrying 1/P of the context up and down, so the P round trips take the
context's transfer time or, on links fast enough, P times a round's floor (SYNC_ROUND_S),
whichever is longer. The scaling of
the compute time: s_N is the share of SD1.5's UNet FLOPs one band computes, counted on the
meta device (bench/patch.py --sd15): 1/N of every layer plus the keys and values it
projects from the other bands' attention inputs; halo rows are inputs of a band's
convolutions, not rows it computes, so they add no FLOPs. All of these are modelled numbers;
the run measures its own.

Choice: for every N the plan tries each device's displaced step time as the slowest
allowed, takes the N devices that fit it with the least energy per step, and keeps the set
that does the most steps, then the one with the largest mean model size, then the shorter
step. The run does S steps: the largest S whose min(W, S) synchronous steps, displaced
steps and (when S > W) final step fit T_max, and likewise E_max.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from testbed.errors import InfeasibleError, TopologyError
from testbed.model.impairments import LinkImpairment, device_impairment
from testbed.model.profiles import Profile, load_profiles, step_time_s
from testbed.model.radio import DeviceLink
from testbed.model.topology import Topology
from testbed.selection.costs import (DEFAULT_LINK_EFFICIENCY, DEFAULT_MESSAGE_OVERHEAD_S, HANDLING_S_PER_MB,
                                     activation_bytes, model_size_mb)
from testbed.selection.transfer import tcp_transfer_time_s

__all__ = ["CONTEXT_BYTES_FP32", "FLOP_SHARE", "LATENT_ROWS", "INPUT_HALO_ROWS", "SYNC_ROUND_S",
           "WARMUP_STEPS", "BandCost", "PatchPlan", "plan_patch", "band_counts", "predicted_latency_s"]

#: SD1.5's context bytes per step and band with fp32 activations (CFG batch 2): what each
#: band sends up and receives down, by resolution, band count and band index. Counted on the
#: meta device by `diffusion.patch.sd15_patch_profile` (bench/patch.py --sd15; a test checks
#: them): halo rows of the 3x3 convolutions, GroupNorm statistics, self-attention inputs.
CONTEXT_BYTES_FP32: dict[int, dict[int, dict[str, tuple[int, ...]]]] = {
    256: {2: {"up": (16210432, 15964672), "down": (15964672, 16210432)},
          4: {"up": (10435072, 14817792, 14817792, 10189312), "down": (21802496, 26430976, 26430976, 22048256)}},
    512: {2: {"up": (55491072, 54999552), "down": (54999552, 55491072)},
          4: {"up": (32389632, 41155072, 41155072, 31898112), "down": (78163456, 87420416, 87420416, 78654976)}},
}
#: Share of SD1.5's UNet FLOPs one band computes (the same for every band), same source.
FLOP_SHARE: dict[int, dict[int, float]] = {256: {2: 0.5261, 4: 0.2892}, 512: {2: 0.5178, 4: 0.2767}}
#: SD1.5's latent rows by resolution, and the rows of context its UNet input carries
#: around a band (its 3x3 conv_in: one above, one below).
LATENT_ROWS = {256: 32, 512: 64}
INPUT_HALO_ROWS = 2
#: Synchronous steps before the displaced ones (DistriFusion warms up the same way: the
#: first step has no previous-step context to reuse).
WARMUP_STEPS = 1
#: The floor of one exchange point of a synchronous step: a message up to the server, its
#: relay down to the other bands, the wake-ups in between, with no link to wait for. Measured
#: (docs/patch.md): 6-15 ms on loopback under a load average of 6-8; the plan takes 15 ms. A
#: point of a paper.yaml run takes ~20-25 ms: its share of the context crossing the shaped
#: links, which the plan charges as the context's transfer time (the floor is not added to
#: it: the published sweep's synchronous steps show no round cost beyond the links).
SYNC_ROUND_S = 0.015


def band_counts(resolution_px: int) -> list[int]:
    """The band counts the plan considers at this resolution."""
    return sorted(CONTEXT_BYTES_FP32.get(resolution_px, {}))


@dataclass(frozen=True)
class BandCost:
    """One device's band, per step: bytes (padded on the wire) and predicted seconds, joules."""

    device: str
    index: int
    task_bytes: int
    noise_bytes: int
    ctx_up_bytes: int
    ctx_down_bytes: int
    t_cmp_s: float  # the profile's compute (emulated)
    t_handling_s: float  # the device's handling of its context messages, under its CPU quota (modelled)
    size_mb: float

    @property
    def id(self) -> str:  # noqa: A003 - what the fault injector keys costs by
        return self.device

    @property
    def t_busy_s(self) -> float:
        """The band's compute window in a step with context: the profile's time, or longer
        when handling the context takes longer (it runs on the same CPU quota as the model)."""
        return max(self.t_cmp_s, self.t_handling_s)


@dataclass(frozen=True)
class PatchPlan:
    """The devices (band i on selected[i]), the step count and the predicted totals."""

    selected: list[str]
    n: int
    steps: int
    warmup_steps: int
    t_max_s: float
    e_max_j: float
    t_sync_s: float
    t_displaced_s: float
    t_final_s: float  # the last step, when displaced: no context to send
    e_sync_j: float
    e_displaced_j: float
    e_final_j: float
    bands: list[BandCost]
    flop_share: float
    sync_points: int
    sets_considered: int
    breakdown: dict[str, float] = field(default_factory=dict)  # the displaced step's terms; t_sync_rounds_s (s)

    @property
    def predicted_latency_s(self) -> float:
        return _total(self.steps, self.t_sync_s, self.t_displaced_s, self.t_final_s, self.warmup_steps)

    @property
    def predicted_energy_j(self) -> float:
        return _total(self.steps, self.e_sync_j, self.e_displaced_j, self.e_final_j, self.warmup_steps)

    @property
    def costs(self) -> list[Any]:
        """Per device what the fault injector reads (`t_cmp_s`: one step's compute)."""
        return list(self.bands)

    @property
    def can_recover(self) -> bool:
        """A band has no other owner (no takeover, docs/reliability.md)."""
        return False

    def to_json(self) -> dict[str, Any]:
        return {
            "selected": list(self.selected), "n": self.n, "steps": self.steps, "warmup_steps": self.warmup_steps,
            "t_max_s": self.t_max_s, "e_max_j": self.e_max_j, "predicted_latency_s": self.predicted_latency_s,
            "predicted_energy_j": self.predicted_energy_j, "t_sync_s": self.t_sync_s,
            "t_displaced_s": self.t_displaced_s, "t_final_s": self.t_final_s, "e_sync_j": self.e_sync_j,
            "e_displaced_j": self.e_displaced_j, "e_final_j": self.e_final_j,
            "flop_share": self.flop_share, "sync_points": self.sync_points, "sets_considered": self.sets_considered,
            "bands": [asdict(b) for b in self.bands], "breakdown": dict(self.breakdown),
        }


@dataclass(frozen=True)
class _Device:
    link: DeviceLink
    profile: Profile
    imp: LinkImpairment
    step_s: float


def _steps_within(budget: float, sync: float, displaced: float, final: float, warmup: int) -> int:
    """The most steps S whose cost fits `budget`: the first min(warmup, S) cost `sync`; after
    them, the last step costs `final` (its context has no reader) and the others `displaced`."""
    eps = 1e-9  # a budget of exactly N steps admits N (float rounding)
    k = min(warmup, int(math.floor(budget / sync + eps)))
    left = budget - warmup * sync - final
    if k < warmup or left < -eps:
        return k
    return warmup + 1 + int(math.floor(left / displaced + eps))


def _total(steps: int, sync: float, displaced: float, final: float, warmup: int) -> float:
    """What `steps` steps cost (the inverse of _steps_within)."""
    if steps <= warmup:
        return steps * sync
    return warmup * sync + (steps - warmup - 1) * displaced + final


class _Model:
    """The step cost of a set of devices (the module docstring's formulas)."""

    def __init__(self, topo: Topology, n: int, sync_points: int, link_efficiency: float):
        wl = topo.workload
        res = wl.resolution_px
        if res not in CONTEXT_BYTES_FP32 or n not in CONTEXT_BYTES_FP32[res]:
            raise TopologyError(f"patch: no SD1.5 context sizes for {res} px and {n} bands; "
                                f"bands: {band_counts(res)}")
        self.n, self.res, self.eta = n, res, link_efficiency
        self.ctx = CONTEXT_BYTES_FP32[res][n]
        self.share = FLOP_SHARE[res][n]
        rows = LATENT_ROWS[res]
        self.task_bytes = math.ceil(wl.payload_bytes * (rows / n + INPUT_HALO_ROWS) / rows)
        self.noise_bytes = math.ceil(wl.payload_bytes / n)
        self.sync_points = sync_points

    def band(self, d: _Device, i: int) -> BandCost:
        scale = activation_bytes(d.link.precision) / 4
        up, down = int(self.ctx["up"][i] * scale), int(self.ctx["down"][i] * scale)
        return BandCost(device=d.link.id, index=i, task_bytes=self.task_bytes, noise_bytes=self.noise_bytes,
                        ctx_up_bytes=up, ctx_down_bytes=down, t_cmp_s=self.share * d.step_s,
                        t_handling_s=0.5 * HANDLING_S_PER_MB * (up + down) / 1e6 / min(1.0, d.profile.cpu_cores),
                        size_mb=model_size_mb(d.link.precision))

    def _transfer(self, devs: list[_Device], nbytes: list[int], direction: str, cap_mbps: float | None) -> float:
        own = []
        for d, b in zip(devs, nbytes):
            rate = d.link.rate_up_mbps if direction == "up" else d.link.rate_down_mbps
            fwd, rev = (d.imp.up, d.imp.down) if direction == "up" else (d.imp.down, d.imp.up)
            own.append(tcp_transfer_time_s(b, rate * 1e6 * self.eta, fwd, rev) + DEFAULT_MESSAGE_OVERHEAD_S)
        t = max(own)
        if cap_mbps is not None:
            t = max(t, sum(nbytes) * 8 / (cap_mbps * 1e6 * self.eta) + DEFAULT_MESSAGE_OVERHEAD_S)
        return t

    def step(self, devs: list[_Device], caps: tuple[float | None, float | None]) -> dict[str, Any]:
        bands = [self.band(d, i) for i, d in enumerate(devs)]
        cap_up, cap_down = caps
        t_task = self._transfer(devs, [b.task_bytes for b in bands], "down", cap_down)
        t_noise = self._transfer(devs, [b.noise_bytes for b in bands], "up", cap_up)
        t_ctx_up = self._transfer(devs, [b.ctx_up_bytes for b in bands], "up", cap_up)
        t_ctx_down = self._transfer(devs, [b.ctx_down_bytes for b in bands], "down", cap_down)
        t_cmp = max(b.t_cmp_s for b in bands)
        t_busy = max(b.t_busy_s for b in bands)
        # the server handles every band's context in turn (selection/costs.py handling_s's server half)
        server = 0.5 * HANDLING_S_PER_MB * sum(b.ctx_up_bytes + b.ctx_down_bytes for b in bands) / 1e6
        t_disp = t_task + max(t_busy + t_noise, t_ctx_up + t_ctx_down) + server
        t_rounds = max(t_ctx_up + t_ctx_down, self.sync_points * SYNC_ROUND_S)  # the P round trips
        t_sync = t_task + t_busy + t_rounds + t_noise + server
        t_final = t_task + t_cmp + t_noise

        def energy(ctx_down_s: float, ctx_up_s: float, context: bool) -> float:  # radios on for the transfers
            return sum(d.profile.radio_rx_power_w * (t_task + ctx_down_s)
                       + d.profile.compute_power_w * (b.t_busy_s if context else b.t_cmp_s)
                       + d.profile.radio_tx_power_w * (t_noise + ctx_up_s) for b, d in zip(bands, devs))

        e_step = energy(t_ctx_down, t_ctx_up, True)
        return {"bands": bands, "t_sync_s": t_sync, "t_displaced_s": t_disp, "t_final_s": t_final,
                "e_sync_j": e_step, "e_displaced_j": e_step, "e_final_j": energy(0.0, 0.0, False),
                "breakdown": {"t_task_down_s": t_task, "t_cmp_s": t_cmp, "t_busy_s": t_busy, "t_noise_up_s": t_noise,
                              "t_ctx_up_s": t_ctx_up, "t_ctx_down_s": t_ctx_down, "t_handling_server_s": server,
                              "t_sync_rounds_s": t_rounds}}


def plan_patch(
    topo: Topology,
    links: list[DeviceLink],
    t_max_s: float,
    e_max_j: float,
    *,
    band_options: list[int] | None = None,
    sync_points: int = 0,
    warmup_steps: int = WARMUP_STEPS,
    link_efficiency: float = DEFAULT_LINK_EFFICIENCY,
    impairments: Mapping[str, LinkImpairment] | None = None,
) -> PatchPlan:
    """The band count, the devices and the step count that fit the budgets best.

    `band_options` limits N (default: `band_counts(resolution)`, at most the candidates);
    `sync_points` is the exchange points of the model that runs (the synchronous step's
    round trips). Raises InfeasibleError naming the shortfall when not one step fits.
    """
    for name, val in (("t_max_s", t_max_s), ("e_max_j", e_max_j)):
        if not (isinstance(val, (int, float)) and math.isfinite(val) and val > 0):
            raise TopologyError(f"{name}={val!r} must be a positive number")
    if warmup_steps < 1:
        raise TopologyError(f"warmup_steps={warmup_steps}: patch parallelism needs at least one synchronous step")
    res = topo.workload.resolution_px
    options = sorted(band_options if band_options is not None else band_counts(res))
    options = [n for n in options if 2 <= n <= len(links)]
    if not options:
        raise InfeasibleError(f"patch diffusion needs at least {min(band_counts(res) or [2])} devices with a link; "
                              f"{len(links)} candidate(s) given")
    devs = _devices(topo, links, impairments)
    caps = _capacities(topo, links)
    best: tuple[tuple[float, ...], list[_Device], dict[str, Any], int, int] | None = None
    considered = 0
    nearest: tuple[float, dict[str, Any], int] | None = None
    for n in options:
        model = _Model(topo, n, sync_points, link_efficiency)
        alone = {d.link.id: model.step([d] * n, caps) for d in devs}  # each device as every band
        for slowest in devs:
            limit = alone[slowest.link.id]["t_displaced_s"]
            fits = [d for d in devs if alone[d.link.id]["t_displaced_s"] <= limit]
            if len(fits) < n:
                continue
            chosen = sorted(fits, key=lambda d: (alone[d.link.id]["e_displaced_j"], d.link.id))[:n]
            chosen.sort(key=lambda d: d.link.id)
            cost = model.step(chosen, caps)
            considered += 1
            steps = min(_steps_within(t_max_s, cost["t_sync_s"], cost["t_displaced_s"], cost["t_final_s"],
                                      warmup_steps),
                        _steps_within(e_max_j, cost["e_sync_j"], cost["e_displaced_j"], cost["e_final_j"],
                                      warmup_steps))
            shortfall = max(cost["t_sync_s"] / t_max_s, cost["e_sync_j"] / e_max_j)
            if nearest is None or shortfall < nearest[0]:
                nearest = (shortfall, cost, n)
            mean_size = sum(model_size_mb(d.link.precision) for d in chosen) / n
            key = (steps, mean_size, -cost["t_displaced_s"])
            if best is None or key > best[0]:
                best = (key, chosen, cost, n, steps)
    if best is None or best[4] == 0:
        assert nearest is not None
        _, cost, n = nearest
        ids = ", ".join(b.device for b in cost["bands"])
        raise InfeasibleError(
            f"patch diffusion: not one step fits T_max {t_max_s:g} s and E_max {e_max_j:g} J; the cheapest set "
            f"({n} bands on {ids}) needs {cost['t_sync_s']:.3g} s and {cost['e_sync_j']:.3g} J for its synchronous "
            f"first step ({cost['breakdown']['t_ctx_up_s'] + cost['breakdown']['t_ctx_down_s']:.3g} s of it moving "
            "the bands' context); raise --tmax / --emax")
    _, chosen, cost, n, steps = best
    return PatchPlan(
        selected=[d.link.id for d in chosen], n=n, steps=steps, warmup_steps=warmup_steps, t_max_s=float(t_max_s),
        e_max_j=float(e_max_j), t_sync_s=cost["t_sync_s"], t_displaced_s=cost["t_displaced_s"],
        t_final_s=cost["t_final_s"], e_sync_j=cost["e_sync_j"], e_displaced_j=cost["e_displaced_j"],
        e_final_j=cost["e_final_j"], bands=cost["bands"],
        flop_share=FLOP_SHARE[res][n], sync_points=sync_points, sets_considered=considered,
        breakdown=cost["breakdown"])


def _devices(topo: Topology, links: list[DeviceLink],
             impairments: Mapping[str, LinkImpairment] | None) -> list[_Device]:
    """Each candidate's link, profile, impairment and SD1.5 step time at the workload's resolution."""
    profiles = load_profiles()
    devs = []
    for lk in links:
        prof = profiles[lk.profile]
        try:
            step_s = step_time_s(prof, topo.workload.resolution_px, lk.precision)
        except KeyError as e:
            raise TopologyError(f"device {lk.id}: {e.args[0]}; add it to data/profiles.yaml") from None
        for name, rate in (("rate_up_mbps", lk.rate_up_mbps), ("rate_down_mbps", lk.rate_down_mbps)):
            if not rate > 0:
                raise TopologyError(f"device {lk.id}: {name}={rate:g}; the device has no usable link")
        imp = (impairments or {}).get(lk.id) or device_impairment(topo, lk.id, lk.snr_up_db, lk.snr_down_db)
        devs.append(_Device(lk, prof, imp, step_s))
    return devs


def _capacities(topo: Topology, links: list[DeviceLink]) -> tuple[float | None, float | None]:
    """The cell's shared capacity up and down (None: not shared)."""
    if not topo.cell.shared_capacity:
        return None, None
    # the emulation's default capacity: the cell's best link (emulation.py)
    return (topo.cell.capacity_up_mbps or max(lk.rate_up_mbps for lk in links),
            topo.cell.capacity_down_mbps or max(lk.rate_down_mbps for lk in links))


def predicted_latency_s(topo: Topology, links: list[DeviceLink], devices: list[str], steps: int, *,
                        sync_points: int, warmup_steps: int = WARMUP_STEPS,
                        link_efficiency: float = DEFAULT_LINK_EFFICIENCY,
                        impairments: Mapping[str, LinkImpairment] | None = None) -> float:
    """What the plan predicts for `steps` steps with band i on devices[i] (`links`: every
    candidate, which sets the shared capacity): to hold a measured run against its model."""
    by_id = {d.link.id: d for d in _devices(topo, links, impairments)}
    cost = _Model(topo, len(devices), sync_points, link_efficiency).step([by_id[d] for d in devices],
                                                                          _capacities(topo, links))
    return _total(steps, cost["t_sync_s"], cost["t_displaced_s"], cost["t_final_s"], warmup_steps)
