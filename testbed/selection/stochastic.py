"""Transfer, stage and run times as distributions: draws of the TCP model, cached per link state. Pure.

A `Distribution` is a set of equally likely draws of one time (seconds) with `.mean()`,
`.quantile(q)` and `.samples`, like a SciPy frozen distribution's `.mean()`, `.ppf()` and
`.rvs()`. Transfers come from tcp_sim.py (a segment-level model of Linux TCP); a stage
is its two transfers plus the cost model's constants (costs.py), a run its stages —
always summed draw by draw, never by adding quantiles, and each part's draws in an order
of their own so that parts that happen to share a cached link state stay independent.

On a link without loss in either direction a transfer is a point: exactly transfer.py's
value, so every mean the cost model predicts there stays what it is. With loss it is the
model's distribution, whose mean is E[T(X)] where transfer.py gives T(E[X]).

Deterministic for a seed: a link state's draws come from a generator seeded with the seed
and the state itself.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from testbed.model.impairments import Impairment, LinkImpairment, link_impairments
from testbed.model.profiles import load_profiles
from testbed.model.radio import DeviceLink
from testbed.model.topology import Topology
from testbed.selection.costs import (
    DEFAULT_LINK_EFFICIENCY,
    RELAY_CALIBRATION,
    DeviceCost,
    RelayCalibration,
    device_costs,
)
from testbed.selection.tcp_sim import path_for, simulate
from testbed.selection.transfer import INITIAL_WINDOW_SEGMENTS, MSS_BYTES, tcp_transfer_time_s

__all__ = [
    "COUNTERS", "DELAYER_PATH", "DRAWS", "MAX_MESSAGES_BEFORE", "NFQUEUE_PASS_S", "RUN_QUANTILES", "STAGE_QUANTILES",
    "ConnectionState", "Distribution", "StageDistribution", "TransferDistribution", "clear_cache",
    "independent_sum", "pass_cost_s", "run_distribution", "stage_distributions", "transfer_distribution",
]

#: Draws per distribution: the p90 of 2000 draws is within ~1.3 percentage points of P.
DRAWS = 2000
#: What the NFQUEUE delayer adds to each pass of a packet (seconds; docs/links.md): `ping -U`
#: through 20 ms links gave 40.70 ms for 40, the 5 ms override 10.74-12.26 ms for 10.
NFQUEUE_PASS_S = 0.0005
#: The delay path (a cell's `impairments.path` in its status, result.json `meta.delay_path`)
#: whose packets pass the NFQUEUE delayer; netem's (and no path) add nothing per pass.
DELAYER_PATH = "nfqueue+iptables"
#: The model's counterparts of the kernel's counters (nstat), per message on average.
COUNTERS = ("retrans_segs", "loss_probes", "timeouts", "recoveries")
STAGE_QUANTILES = {"p10": 0.10, "p50": 0.50, "p90": 0.90}
RUN_QUANTILES = {"p10": 0.10, "p50": 0.50, "p90": 0.90, "p95": 0.95}
#: After this many messages a connection's state no longer changes its next message's
#: distribution (20 ms / 1 %: the mean after 5, 8, 10 and 20 earlier messages agrees within
#: the draws' noise); longer histories are cut to it.
MAX_MESSAGES_BEFORE = 8


class Distribution:
    """Equally likely draws of a time in seconds. A point value has one draw repeated."""

    __slots__ = ("samples", "_point")

    def __init__(self, samples: Iterable[float] | np.ndarray, point: float | None = None):
        arr = np.array(samples, dtype=float)  # a copy, read-only: cached draws are shared
        if arr.ndim != 1 or arr.size == 0 or not np.isfinite(arr).all():
            raise ValueError("a Distribution needs a non-empty 1-D array of finite draws")
        arr.setflags(write=False)
        self.samples = arr
        self._point = point

    @classmethod
    def point(cls, value: float, draws: int = DRAWS) -> Distribution:
        return cls(np.full(draws, float(value)), point=float(value))

    @property
    def is_point(self) -> bool:
        return self._point is not None

    def mean(self) -> float:
        return self._point if self._point is not None else float(self.samples.mean())

    def quantile(self, q: float | Sequence[float]) -> float | np.ndarray:
        """The q-quantile(s) of the draws (linear interpolation); a point's is the point."""
        if self._point is not None:
            return self._point if np.ndim(q) == 0 else np.full(len(q), self._point)  # type: ignore[arg-type]
        out = np.quantile(self.samples, q)
        return float(out) if np.ndim(q) == 0 else out

    def quantiles(self, levels: Mapping[str, float] = STAGE_QUANTILES) -> dict[str, float]:
        """{"p10": ..., "p50": ..., "p90": ...} (or the given levels)."""
        return {k: float(self.quantile(q)) for k, q in levels.items()}

    def share_within(self, limit_s: float) -> float:
        """P(X <= limit_s) under the draws."""
        return float(np.mean(self.samples <= limit_s))

    def shifted(self, seconds: float) -> Distribution:
        """X + a constant."""
        return Distribution(self.samples + seconds, None if self._point is None else self._point + seconds)

    def __repr__(self) -> str:
        if self._point is not None:
            return f"Distribution(point {self._point:.6g} s)"
        p = self.quantiles()
        return f"Distribution(mean {self.mean():.4g} s, p10 {p['p10']:.4g}, p50 {p['p50']:.4g}, p90 {p['p90']:.4g})"


class TransferDistribution(Distribution):
    """One message's time on a link (first byte sent -> last byte received), what the
    kernel's counters would count per message on average (the model's, for checks), and
    the sender's window after the message, draw by draw (segments; ssthresh inf: never
    reduced) — what `ss -ti` shows on the connection before its next idle restart."""

    __slots__ = ("counters", "end_cwnd", "end_ssthresh")

    def __init__(self, samples: np.ndarray, point: float | None = None, counters: Mapping[str, float] | None = None,
                 end_cwnd: np.ndarray | None = None, end_ssthresh: np.ndarray | None = None):
        super().__init__(samples, point)
        self.counters = dict(counters or dict.fromkeys(COUNTERS, 0.0))
        self.end_cwnd = end_cwnd
        self.end_ssthresh = end_ssthresh


@dataclass(frozen=True)
class ConnectionState:
    """The sender's window when a message starts (segments). Fresh: the initial window and
    no ssthresh yet (RFC 6928; Linux keeps no ssthresh between connections by default,
    net.ipv4.tcp_no_ssthresh_metrics_save = 1)."""

    cwnd_segments: float = INITIAL_WINDOW_SEGMENTS
    ssthresh_segments: float = math.inf

    def __post_init__(self) -> None:
        if not self.cwnd_segments >= 1 or not self.ssthresh_segments >= 2:
            raise ValueError(f"ConnectionState: cwnd {self.cwnd_segments} must be >= 1 and ssthresh "
                             f"{self.ssthresh_segments} >= 2 segments")

    @property
    def is_fresh(self) -> bool:
        return self.cwnd_segments == INITIAL_WINDOW_SEGMENTS and math.isinf(self.ssthresh_segments)

    def after_idle(self) -> ConnectionState:
        """After an idle of several RTOs (net.ipv4.tcp_slow_start_after_idle = 1, Linux's
        tcp_cwnd_restart): cwnd back to min(initial window, cwnd), ssthresh at least 3/4 of
        the old cwnd."""
        return ConnectionState(*_restart(np.array([self.cwnd_segments]), np.array([self.ssthresh_segments]))[0:2])


def _restart(cwnd: np.ndarray, ssth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """tcp_cwnd_restart after a long idle: ssthresh = max(ssthresh, (c >> 1) + (c >> 2)), cwnd = min(IW, c)."""
    c = np.floor(cwnd).astype(np.int64)
    return np.minimum(cwnd, INITIAL_WINDOW_SEGMENTS), np.maximum(ssth, (c >> 1) + (c >> 2))


def transfer_distribution(
    payload_bytes: int,
    goodput_bps: float,
    forward: Impairment,
    reverse: Impairment = Impairment(),
    connection: ConnectionState = ConnectionState(),
    *,
    messages_before: int = 0,
    per_pass_s: float = 0.0,
    draws: int = DRAWS,
    seed: int = 0,
) -> TransferDistribution:
    """One message's time on a link (module docstring); cached per link state.

    `goodput_bps`: payload bits per second the shaped link carries; `forward`: the data's
    direction, `reverse`: the ACKs'. `connection`: the sender's window when the first
    message starts; `messages_before`: how many messages of the same size went over the
    same connection before this one, each followed by an idle of several RTOs (a relay
    agent's MQTT connection carries one latent each way per run), their losses carried in
    ssthresh draw by draw. `per_pass_s`: what a delayer adds per pass of a delayed direction
    (NFQUEUE_PASS_S on the nfqueue path, 0 on netem)."""
    if not goodput_bps > 0 or not math.isfinite(goodput_bps):
        raise ValueError(f"goodput_bps={goodput_bps!r} must be a positive number")
    if messages_before < 0 or draws < 1 or per_pass_s < 0:
        raise ValueError("messages_before >= 0, draws >= 1 and per_pass_s >= 0, please")
    return _cached(int(payload_bytes), float(goodput_bps), forward, reverse, connection,
                   min(int(messages_before), MAX_MESSAGES_BEFORE),
                   float(per_pass_s), int(draws), int(seed))


@functools.lru_cache(maxsize=1024)
def _cached(payload: int, goodput: float, fwd: Impairment, rev: Impairment, conn: ConnectionState, before: int,
            per_pass: float, draws: int, seed: int) -> TransferDistribution:
    fwd_p, rev_p = _passed(fwd, per_pass), _passed(rev, per_pass)
    if payload <= 0:
        return TransferDistribution(np.zeros(draws), point=0.0)
    lossless = fwd.loss_pct <= 0 and rev.loss_pct <= 0
    if lossless and conn.is_fresh:
        # nothing random and nothing carried (a lossless connection never sets ssthresh):
        # exactly the cost model's transfer time
        value = tcp_transfer_time_s(payload, goodput, fwd_p, rev_p)
        return TransferDistribution(np.full(draws, value), point=value)
    n = 1 if lossless else draws
    key = repr((payload, goodput, fwd, rev, conn, before, per_pass, draws))
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    path = path_for(payload, goodput, MSS_BYTES, (fwd_p.delay_ms + fwd_p.jitter_ms) / 1e3,
                    (rev_p.delay_ms + rev_p.jitter_ms) / 1e3, fwd.loss_pct / 100, rev.loss_pct / 100)
    if before == 0:
        cwnd, ssth = np.full(n, conn.cwnd_segments), np.full(n, conn.ssthresh_segments)
    else:  # the connection after `before` messages: the one before this one's end state, after its idle
        prev = _cached(payload, goodput, fwd, rev, conn, before - 1, per_pass, draws, seed)
        assert prev.end_cwnd is not None and prev.end_ssthresh is not None
        cwnd, ssth = _restart(prev.end_cwnd[:n].astype(float), prev.end_ssthresh[:n].astype(float))
    out = simulate(path, cwnd, ssth, rng)
    counters = {k: float(getattr(out, k).mean()) for k in COUNTERS}
    if n == 1:
        return TransferDistribution(np.full(draws, out.time_s[0]), point=float(out.time_s[0]), counters=counters,
                                    end_cwnd=np.full(draws, out.cwnd_end[0]),
                                    end_ssthresh=np.full(draws, out.ssthresh_end[0]))
    return TransferDistribution(out.time_s, counters=counters, end_cwnd=out.cwnd_end, end_ssthresh=out.ssthresh_end)


def clear_cache() -> None:
    """Forget every cached transfer distribution (benchmarks time the model from cold)."""
    _cached.cache_clear()


def pass_cost_s(delay_path: str | None) -> float:
    """What each pass through a cell's delay path adds (seconds): NFQUEUE_PASS_S on the
    NFQUEUE delayer, 0 on netem or where nothing is delayed."""
    return NFQUEUE_PASS_S if delay_path == DELAYER_PATH else 0.0


def _passed(one: Impairment, per_pass_s: float) -> Impairment:
    """A delayed direction's packets pass the delayer, which adds its per-pass cost."""
    if per_pass_s <= 0 or (one.delay_ms <= 0 and one.jitter_ms <= 0):
        return one
    return Impairment(one.delay_ms + per_pass_s * 1e3, one.jitter_ms, one.loss_pct)


def independent_sum(parts: Sequence[Distribution | float], key: str = "", seed: int = 0) -> Distribution:
    """The distribution of a sum of independent parts (constants allowed), draw by draw;
    each part's draws are put in an order of their own first (seeded by `key`, `seed` and
    the part's position), so equal cached parts do not add up as one."""
    dists = [p for p in parts if isinstance(p, Distribution)]
    const = math.fsum(float(p) for p in parts if not isinstance(p, Distribution))
    if not dists:
        return Distribution.point(const)
    draws = {d.samples.size for d in dists}
    if len(draws) != 1:
        raise ValueError(f"parts have different numbers of draws: {sorted(draws)}")
    if all(d.is_point for d in dists):
        total = 0.0
        for p in parts:  # in the given order: the same float sums as the point cost model
            total += p.mean() if isinstance(p, Distribution) else float(p)
        return Distribution.point(total, draws.pop())
    acc = np.full(draws.pop(), const)
    for pos, d in enumerate(dists):
        if d.is_point:
            acc += d.mean()
        else:
            rng = np.random.default_rng([seed, zlib.crc32(f"{key}/{pos}".encode())])
            acc += rng.permutation(d.samples)
    return Distribution(acc)


@dataclass(frozen=True)
class StageDistribution:
    """One device's stage as distributions: its two transfers (with the relay's constants
    that costs.py adds to them) and their sum with the constant compute and handling."""

    id: str
    cost: DeviceCost  # the point cost model's stage (energy stays its mean)
    t_down: Distribution  # tcp + message overhead
    t_up: Distribution  # tcp + message overhead + the device's encode
    latency: Distribution  # t_down + t_cmp + t_up + t_handling, draw by draw

    def quantiles_record(self) -> dict[str, dict[str, float]]:
        """The stage record's `predicted.quantiles_s`: {"t_down_s": {"p10","p50","p90"}, "t_up_s": {...}}."""
        return {"t_down_s": self.t_down.quantiles(STAGE_QUANTILES), "t_up_s": self.t_up.quantiles(STAGE_QUANTILES)}


def stage_distributions(
    topo: Topology,
    links: list[DeviceLink],
    *,
    impairments: Mapping[str, LinkImpairment] | None = None,
    costs: Sequence[DeviceCost] | None = None,
    link_efficiency: float = DEFAULT_LINK_EFFICIENCY,
    message_overhead_s: float | None = None,
    calibration: RelayCalibration = RELAY_CALIBRATION,
    messages_before: Mapping[str, int] | int = 0,
    connections: Mapping[str, tuple[ConnectionState, ConnectionState]] | None = None,
    per_pass_s: float = 0.0,
    draws: int = DRAWS,
    seed: int = 0,
) -> list[StageDistribution]:
    """Every device's stage as distributions, in link order, matching `device_costs(topo,
    links, ...)` (pass its result as `costs` to save computing it again): on lossless links
    each part is a point equal to that cost's term.

    `messages_before`: per device id (or one number for all) how many runs its agent's
    connection has carried before this one (0: a fresh connection, as after `testbed up`).
    `connections`: per device id the senders' windows when the messages start, (downlink:
    the broker's socket, uplink: the agent's), e.g. read from the kernel (`ss -ti`) and
    passed through `ConnectionState.after_idle()`; a device without one starts fresh."""
    if costs is None:
        costs = device_costs(topo, links, link_efficiency=link_efficiency, message_overhead_s=message_overhead_s,
                             impairments=impairments, calibration=calibration)
    by_id = {c.id: c for c in costs}
    overhead = calibration.message_overhead_s if message_overhead_s is None else message_overhead_s
    impaired = link_impairments(topo, links) | dict(impairments or {})
    profiles = load_profiles()
    payload = topo.workload.payload_bytes
    out: list[StageDistribution] = []
    for link in links:
        cost = by_id.get(link.id)
        if cost is None:
            continue
        imp = impaired[link.id]
        before = messages_before if isinstance(messages_before, int) else int(messages_before.get(link.id, 0))
        common = dict(messages_before=before, per_pass_s=per_pass_s, draws=draws, seed=seed)
        conn_down, conn_up = (connections or {}).get(link.id, (ConnectionState(), ConnectionState()))
        down = transfer_distribution(payload, link.rate_down_mbps * 1e6 * link_efficiency, imp.down, imp.up, conn_down,
                                     **common)
        up = transfer_distribution(payload, link.rate_up_mbps * 1e6 * link_efficiency, imp.up, imp.down, conn_up,
                                   **common)
        encode = calibration.encode_s(payload, profiles[link.profile].cpu_cores)
        t_down = independent_sum([down, overhead], f"{link.id}/down", seed)
        t_up = independent_sum([up, overhead, encode], f"{link.id}/up", seed)
        latency = independent_sum([t_down, cost.t_cmp_s, t_up, cost.t_handling_s], f"{link.id}/stage", seed)
        out.append(StageDistribution(link.id, cost, t_down, t_up, latency))
    return out


def run_distribution(stages: Sequence[StageDistribution], seed: int = 0) -> Distribution:
    """A run's latency: its stages' latencies summed draw by draw (each in its own order)."""
    return independent_sum([s.latency for s in stages], "run/" + ",".join(s.id for s in stages), seed)
