"""Link impairments as data: the topology's `links:` / `link:` fields, the radio-derived
model, and the transfer-time prediction that accounts for delay and loss (pure)."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from testbed.errors import TopologyError
from testbed.model.impairments import (
    Impairment,
    LinkImpairment,
    harq_failure_probability,
    link_impairments,
    load_radio_link_params,
    radio_impairment,
)
from testbed.model.radio import compute_links
from testbed.model.topology import load_topology, parse_topology, place
from testbed.selection import device_costs
from testbed.selection.transfer import (
    INITIAL_WINDOW_SEGMENTS,
    MSS_BYTES,
    loss_limited_rate_bps,
    rtt_s,
    slow_start_time_s,
    tcp_transfer_time_s,
)

BASE = """
name: t
devices:
  list:
    - {id: dev01, position: {x_m: 300, y_m: 250}}
    - {id: dev02, position: {x_m: 200, y_m: 250}%s}
radio: {los: los}
"""


def topo(links: str = "", dev02_link: str = ""):
    return parse_topology(BASE % dev02_link + links)


def impairments_of(t) -> dict[str, LinkImpairment]:
    return link_impairments(t, compute_links(t, place(t)))


# -- topology fields -------------------------------------------------------------------------

def test_no_links_block_means_no_impairment(topologies):
    for name in ("paper.yaml", "small.yaml"):
        t = load_topology(topologies / name)
        assert t.links is None
        assert all(i.is_zero for i in impairments_of(t).values())


def test_fixed_links_apply_to_every_device_in_both_directions():
    imp = impairments_of(topo("links: {delay_ms: 20, jitter_ms: 2, loss_pct: 2}\n"))
    for dev in ("dev01", "dev02"):
        assert imp[dev] == LinkImpairment.symmetric(20, 2, 2)
        assert imp[dev].rtt_ms == 40


def test_device_override_replaces_only_the_fields_it_gives():
    t = topo("links: {delay_ms: 20, loss_pct: 2}\n", ", link: {delay_ms: 5}")
    imp = impairments_of(t)
    assert imp["dev01"] == LinkImpairment.symmetric(20, 0, 2)
    assert imp["dev02"] == LinkImpairment.symmetric(5, 0, 2)


def test_override_without_a_links_block():
    imp = impairments_of(topo("", ", link: {delay_ms: 7, loss_pct: 1}"))
    assert imp["dev01"].is_zero and imp["dev02"] == LinkImpairment.symmetric(7, 0, 1)


@pytest.mark.parametrize("links, dev02, field, hint", [
    ("links: {delay_ms: 5, jitter_ms: 6}\n", "", "links", "lower jitter_ms"),
    ("links: {impairments: radio, delay_ms: 5}\n", "", "links", "impairments: fixed"),
    ("links: {loss_pct: 100}\n", "", "links.loss_pct", "less than 100"),
    ("links: {delay_ms: -1}\n", "", "links.delay_ms", "greater than or equal to 0"),
    ("links: {delay_ms: 5, color: red}\n", "", "links.color", "unknown key"),
    ("links: {delay_ms: 5}\n", ", link: {jitter_ms: 9}", "devices.list[1].link.jitter_ms", "exceeds"),
    ("links: {impairments: radio}\n", ", link: {jitter_ms: 9}", "devices.list[1].link.jitter_ms", "exceeds"),
])
def test_bad_link_fields_name_the_field_and_the_fix(links, dev02, field, hint):
    with pytest.raises(TopologyError) as e:
        topo(links, dev02)
    assert field in str(e.value) and hint in str(e.value)


def test_schema_has_the_contract_names():
    from testbed.model.topology import topology_json_schema

    schema = topology_json_schema()
    links = schema["$defs"]["LinksConfig"]["properties"]
    assert {"impairments", "delay_ms", "jitter_ms", "loss_pct"} <= set(links)
    assert set(schema["$defs"]["LinkOverride"]["properties"]) == {"delay_ms", "jitter_ms", "loss_pct"}


# -- the radio model ------------------------------------------------------------------------

@pytest.mark.parametrize("a", [0.05, 0.105, 0.5, 2.0])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_harq_failure_is_the_erlang_cdf(a, k):
    assert harq_failure_probability(a, k) == pytest.approx(stats.gamma.cdf(a, k), rel=1e-9, abs=1e-15)


def test_radio_first_transmission_holds_the_bler_target_where_it_can():
    p = load_radio_link_params()
    # one retransmission in ten at the target, almost never a second: ~0.8 ms more delay
    high = radio_impairment(25.0, "down")
    assert high.delay_ms == pytest.approx(p.base_delay_ms["down"] + p.harq_rtt_ms * 0.105, abs=0.05)
    assert high.loss_pct < 1e-3
    assert radio_impairment(10.0, "down") == high  # link adaptation: the same above ~3 dB


def test_radio_impairment_grows_towards_the_cell_edge():
    snrs = [20, 5, 0, -3, -6, -9]
    imps = [radio_impairment(s, "up") for s in snrs]
    delays = [i.delay_ms for i in imps]
    losses = [i.loss_pct for i in imps]
    assert delays == sorted(delays) and losses == sorted(losses)
    assert delays[-1] > delays[0] + 8 and losses[-1] > 1


def test_paper_radio_gives_cell_edge_devices_more_delay_and_loss(topologies):
    t = load_topology(topologies / "paper-radio.yaml")
    links = {lk.id: lk for lk in compute_links(t, place(t))}
    imp = link_impairments(t, list(links.values()))
    edge = min(links, key=lambda d: links[d].snr_up_db)
    centre = max(links, key=lambda d: links[d].snr_up_db)
    assert imp[edge].rtt_ms > imp[centre].rtt_ms + 3
    assert imp[edge].up.loss_pct > 10 * imp[centre].up.loss_pct
    costs = {c.id: c for c in device_costs(t, list(links.values()))}
    plain = {c.id: c for c in device_costs(load_topology(topologies / "paper.yaml"), list(links.values()))}
    transfer = {d: costs[d].t_down_s + costs[d].t_up_s for d in links}
    assert transfer[edge] > 2 * transfer[centre]
    # every link pays for the delay; a fast link pays more of its time in slow-start rounds
    assert all(transfer[d] > plain[d].t_down_s + plain[d].t_up_s for d in links)


# -- the transfer-time prediction ----------------------------------------------------------------

RATE = 95e6


def test_without_impairments_it_is_payload_over_rate():
    for payload in (1, 262144, 14 * 2**20):
        assert tcp_transfer_time_s(payload, RATE, Impairment()) == pytest.approx(payload * 8 / RATE, rel=1e-12)


def test_slow_start_rounds_at_the_rtt():
    rtt = 0.040
    # 10, 20, 40, 80 segments fit the 475 KB bandwidth-delay product: four window-limited
    # rounds, then the remaining bytes at the link's rate
    payload = 262144
    sent = MSS_BYTES * INITIAL_WINDOW_SEGMENTS * (1 + 2 + 4 + 8)
    assert slow_start_time_s(payload, RATE, rtt) == pytest.approx(4 * rtt + (payload - sent) * 8 / RATE)
    one = Impairment(20)
    expect = slow_start_time_s(payload, RATE, rtt_s(one, one, RATE)) + 0.020
    assert tcp_transfer_time_s(payload, RATE, one, one) == pytest.approx(expect)


def test_mathis_rate():
    rtt = 0.041
    assert loss_limited_rate_bps(0.01, rtt) == pytest.approx(MSS_BYTES * 8 / rtt * math.sqrt(1.5 / 0.01))
    assert loss_limited_rate_bps(0.0, rtt) == math.inf


def test_prediction_grows_with_delay_loss_and_jitter():
    t = lambda d, j, l: tcp_transfer_time_s(262144, RATE, Impairment(d, j, l), Impairment(d, j, l))  # noqa: E731
    assert t(0, 0, 0) < t(5, 0, 0) < t(20, 0, 0) < t(50, 0, 0)
    assert t(20, 0, 0) < t(20, 0, 0.5) < t(20, 0, 2)
    assert t(20, 0, 0) < t(20, 5, 0)
    # a lossy link: tens of percent, as the issue expects of T_down/T_up
    assert t(20, 0, 2) > 2 * t(20, 0, 0)


def test_device_costs_take_live_impairments_over_the_topology():
    t = topo("links: {delay_ms: 20, loss_pct: 1}\n")
    links = compute_links(t, place(t))
    from_topo = {c.id: c for c in device_costs(t, links)}
    live = {c.id: c for c in device_costs(t, links, impairments={"dev01": LinkImpairment()})}
    plain = {c.id: c for c in device_costs(topo(), links)}
    assert live["dev01"].t_down_s == pytest.approx(plain["dev01"].t_down_s)
    assert live["dev02"].t_down_s == from_topo["dev02"].t_down_s > plain["dev02"].t_down_s
