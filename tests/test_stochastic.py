"""Transfer, stage and run times as distributions (pure): the segment-level TCP model
against what it must reproduce (the point model on lossless links, the loss process, the
timers), the distribution API, sums of draws, the connection's carried state."""

from __future__ import annotations

import math

import numpy as np
import pytest

from testbed.model.impairments import Impairment, LinkImpairment
from testbed.model.radio import compute_links
from testbed.model.topology import load_topology, place
from testbed.selection.costs import device_costs
from testbed.selection.stochastic import (
    ConnectionState,
    Distribution,
    independent_sum,
    run_distribution,
    stage_distributions,
    transfer_distribution,
)
from testbed.selection.tcp_sim import RTO_MIN_S, path_for, simulate
from testbed.selection.transfer import MSS_BYTES, tcp_transfer_time_s

REPO_TOPOLOGIES = __import__("pathlib").Path(__file__).resolve().parent.parent / "topologies"
L = 262144


@pytest.mark.parametrize("rate_mbps, delay_ms, jitter_ms, size", [
    (100, 20, 0, L), (9, 5, 0, L), (200, 0, 0, L), (50, 40, 3, L), (20, 10, 0, 1000), (300, 2, 0, 7 * 2**20),
])
def test_lossless_transfer_is_exactly_the_point_model(rate_mbps, delay_ms, jitter_ms, size):
    imp = Impairment(delay_ms, jitter_ms, 0)
    g = rate_mbps * 1e6 * 0.95
    d = transfer_distribution(size, g, imp, imp)
    assert d.is_point and d.mean() == tcp_transfer_time_s(size, g, imp, imp)
    assert d.quantile(0.9) == d.mean() and set(d.quantiles()) == {"p10", "p50", "p90"}
    # the simulator itself (not the shortcut) gives the same time without loss
    one_way = (delay_ms + jitter_ms) / 1e3
    out = simulate(path_for(size, g, MSS_BYTES, one_way, one_way, 0.0, 0.0), np.array([10.0]), np.array([np.inf]),
                   np.random.default_rng(0))
    assert out.time_s[0] == pytest.approx(d.mean(), rel=1e-12, abs=1e-12)
    assert out.retrans_segs[0] == out.loss_probes[0] == out.timeouts[0] == 0


def test_lossless_stages_keep_the_cost_model_exactly():
    topo = load_topology(REPO_TOPOLOGIES / "small-lossy.yaml")
    links = compute_links(topo, place(topo))
    costs = device_costs(topo, links)
    stages = {s.id: s for s in stage_distributions(topo, links, costs=costs)}
    for c in costs:
        s = stages[c.id]
        if c.id == "dev02":  # 5 ms, no loss
            assert s.latency.is_point and s.latency.mean() == c.latency_s
            assert s.t_down.mean() == c.t_down_s and s.t_up.mean() == c.t_up_s
            assert s.quantiles_record()["t_up_s"] == {"p10": c.t_up_s, "p50": c.t_up_s, "p90": c.t_up_s}
        else:  # 20 ms, 1 %: a spread, the mean above the point model's T(E[X])
            assert not s.latency.is_point and s.latency.mean() > c.latency_s
            q = s.quantiles_record()["t_down_s"]
            assert q["p10"] < q["p50"] < q["p90"]
    paper = load_topology(REPO_TOPOLOGIES / "paper.yaml")
    plinks = compute_links(paper, place(paper))
    for c, s in zip(device_costs(paper, plinks), stage_distributions(paper, plinks)):
        assert s.latency.is_point and s.latency.mean() == c.latency_s


def test_loss_process_and_shape_at_20ms_1pct():
    """The issue's reference link: 16 % of 256 KB messages lose nothing (0.99^182) and take
    exactly the lossless time; none is faster; the mean is E[T(X)] > T(E[X]); a tail."""
    imp = Impairment(20, 0, 1)
    g = 100e6 * 0.95
    d = transfer_distribution(L, g, imp, imp)
    lossless = tcp_transfer_time_s(L, g, Impairment(20, 0, 0), Impairment(20, 0, 0))
    x = d.samples
    assert x.min() >= lossless - 1e-9
    clean = np.mean(np.isclose(x, lossless, rtol=0, atol=1e-9))
    assert abs(clean - 0.99 ** math.ceil(L / MSS_BYTES)) < 0.03
    assert d.mean() > tcp_transfer_time_s(L, g, imp, imp) and d.quantile(0.9) > 2 * d.quantile(0.1)
    assert 1.5 < d.counters["retrans_segs"] < 2.3  # ~1.8 losses of ~182 segments + their repairs
    assert d.counters["recoveries"] > 0.5


def test_a_lost_single_segment_waits_for_a_timer():
    """A one-segment message lost with probability 10 %: it arrives after one one-way
    delay, or after the loss probe / RTO (>= 200 ms): about one draw in ten."""
    imp_f, imp_r = Impairment(10, 0, 10), Impairment(10, 0, 0)
    d = transfer_distribution(1000, 50e6, imp_f, imp_r, draws=4000)
    late = d.share_within(0.2)
    assert 0.86 < late < 0.94
    assert d.quantile(0.5) < 0.02 and d.quantile(0.97) > RTO_MIN_S
    assert 0.08 < d.counters["loss_probes"] + d.counters["timeouts"] < 0.14


def test_more_loss_or_delay_takes_longer():
    g = 50e6
    means = [transfer_distribution(L, g, Impairment(20, 0, p), Impairment(20, 0, p)).mean() for p in (0.2, 1, 3)]
    assert means[0] < means[1] < means[2]
    means = [transfer_distribution(L, g, Impairment(d, 0, 1), Impairment(d, 0, 1)).mean() for d in (5, 20, 50)]
    assert means[0] < means[1] < means[2]


def test_deterministic_for_a_seed():
    imp = Impairment(20, 0, 1)
    a = transfer_distribution(L, 95e6, imp, imp, seed=3)
    b = transfer_distribution(L, 95e6, imp, imp, seed=3, draws=2000)
    c = transfer_distribution(L, 95e6, imp, imp, seed=4)
    assert np.array_equal(a.samples, b.samples) and not np.array_equal(a.samples, c.samples)
    assert abs(a.mean() - c.mean()) / a.mean() < 0.06  # two seeds, one distribution


def test_ssthresh_carried_over_a_connection():
    """A lossy message leaves ssthresh low; after the idle between runs cwnd restarts from
    the initial window but ssthresh stays: the next messages slow-start only that far."""
    imp = Impairment(20, 0, 1)
    first = transfer_distribution(L, 95e6, imp, imp)
    later = transfer_distribution(L, 95e6, imp, imp, messages_before=3)
    assert later.mean() > 1.3 * first.mean() and later.quantile(0.1) > first.quantile(0.1)
    lossless = Impairment(20, 0, 0)
    assert transfer_distribution(L, 95e6, lossless, lossless, messages_before=3).mean() == \
        transfer_distribution(L, 95e6, lossless, lossless).mean()
    low = transfer_distribution(L, 95e6, lossless, lossless, ConnectionState(10, 12))
    assert low.is_point and low.mean() > transfer_distribution(L, 95e6, lossless, lossless).mean()


def test_stage_distributions_take_the_kernel_s_windows():
    topo = load_topology(REPO_TOPOLOGIES / "small-lossy.yaml")
    links = compute_links(topo, place(topo))
    low = (ConnectionState(10, 6), ConnectionState(10, 6))
    fresh = {s.id: s for s in stage_distributions(topo, links)}
    carried = {s.id: s for s in stage_distributions(topo, links, connections={"dev01": low, "dev02": low})}
    assert carried["dev01"].t_up.mean() > 1.3 * fresh["dev01"].t_up.mean()
    assert carried["dev02"].t_down.mean() > fresh["dev02"].t_down.mean()  # lossless, but a low ssthresh is slow
    assert carried["dev03"].t_up.mean() == fresh["dev03"].t_up.mean()


def test_connection_state_after_idle():
    assert ConnectionState(41, 16).after_idle() == ConnectionState(10, 30)  # (41 >> 1) + (41 >> 2)
    assert ConnectionState(6, 4).after_idle() == ConnectionState(6, 4)  # (6 >> 1) + (6 >> 2) = 4
    assert ConnectionState().after_idle() == ConnectionState()
    with pytest.raises(ValueError):
        ConnectionState(0.5, 10)


def test_sums_of_draws_are_independent_even_for_equal_parts():
    imp = Impairment(20, 0, 1)
    d = transfer_distribution(L, 95e6, imp, imp)
    twice = independent_sum([d, d], "x")
    assert twice.mean() == pytest.approx(2 * d.mean())
    assert twice.samples.var() == pytest.approx(2 * d.samples.var(), rel=0.15)  # not 4 var: not d + d
    assert independent_sum([d, d], "x").samples.tolist() == twice.samples.tolist()
    assert independent_sum([Distribution.point(0.1), 0.2]).is_point
    with pytest.raises(ValueError):
        independent_sum([d, Distribution.point(1.0, draws=10)])


def test_run_distribution_sums_draws_not_quantiles():
    topo = load_topology(REPO_TOPOLOGIES / "small-lossy.yaml")
    links = compute_links(topo, place(topo))
    stages = stage_distributions(topo, links)
    run = run_distribution(stages)
    assert run.mean() == pytest.approx(sum(s.latency.mean() for s in stages), rel=1e-12)
    assert run.quantile(0.9) < sum(s.latency.quantile(0.9) for s in stages)  # independent tails rarely add up
    assert run.quantile(0.1) > sum(s.latency.quantile(0.1) for s in stages)


def test_distribution_api():
    d = Distribution([0.3, 0.1, 0.2, 0.4])
    assert d.mean() == pytest.approx(0.25) and d.quantile(0.5) == pytest.approx(0.25)
    assert list(d.quantile([0.0, 1.0])) == [0.1, 0.4] and d.share_within(0.2) == 0.5
    assert d.shifted(1.0).mean() == pytest.approx(1.25)
    with pytest.raises(ValueError):
        d.samples[0] = 1.0  # shared draws are read-only
    for bad in ([], [[1.0]], [math.nan]):
        with pytest.raises(ValueError):
            Distribution(bad)
    with pytest.raises(ValueError):
        transfer_distribution(L, 0.0, Impairment(), Impairment())


def test_delayer_pass_cost_only_on_delayed_directions():
    plain, delayed = Impairment(0, 0, 0), Impairment(10, 0, 0)
    assert transfer_distribution(L, 50e6, plain, plain, per_pass_s=0.0005).mean() == \
        transfer_distribution(L, 50e6, plain, plain).mean()
    with_pass = transfer_distribution(L, 50e6, delayed, delayed, per_pass_s=0.0005).mean()
    assert with_pass == tcp_transfer_time_s(L, 50e6, Impairment(10.5, 0, 0), Impairment(10.5, 0, 0))


def test_live_impairments_override_the_topology():
    topo = load_topology(REPO_TOPOLOGIES / "small-lossy.yaml")
    links = compute_links(topo, place(topo))
    clean = {lk.id: LinkImpairment() for lk in links}
    for s in stage_distributions(topo, links, impairments=clean):
        assert s.latency.is_point
