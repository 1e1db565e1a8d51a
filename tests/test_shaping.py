"""The shaping plan without root (plan, apply, read back): ops, class ids, rates, capacities, diffs."""

from __future__ import annotations

import pytest

from testbed.emulation.shaping import (
    HTB_HANDLE,
    INGRESS_HANDLE,
    TC_H_INGRESS,
    TC_H_ROOT,
    HtbClass,
    LinkRate,
    Qdisc,
    U32Filter,
    diff_plan,
    mbps_to_bps,
    plan_cell,
    plan_rates,
)
from testbed.errors import ShapingError

LINKS = [
    LinkRate("dev01", "198.18.0.10", up_mbps=5.0, down_mbps=20.0),
    LinkRate("dev02", "198.18.0.11", up_mbps=1.5, down_mbps=100.0),
]


def _by_type(plan, t):
    return [op for op in plan.ops if isinstance(op, t)]


def test_plan_layout() -> None:
    plan = plan_cell("br", "ifb", LINKS)
    assert _by_type(plan, Qdisc)[:3] == [
        Qdisc("br", "htb", HTB_HANDLE, TC_H_ROOT),
        Qdisc("ifb", "htb", HTB_HANDLE, TC_H_ROOT),
        Qdisc("br", "ingress", INGRESS_HANDLE, TC_H_INGRESS),
    ]
    # each device class has its own leaf queue of 100 ms at its rate (at least 16 packets)
    leaves = {(q.ifname, q.parent): q for q in _by_type(plan, Qdisc) if q.kind == "pfifo"}
    assert len(leaves) == 2 * len(LINKS)
    assert leaves[("br", 0x10101)] == Qdisc("br", "pfifo", 0x1010000, 0x10101, limit_packets=826)
    assert leaves[("ifb", 0x10101)].limit_packets == 16
    assert plan.classes == {"dev01": 0x10100, "dev02": 0x10101}
    classes = {(c.ifname, c.classid): c for c in _by_type(plan, HtbClass)}
    assert classes[("br", 0x10100)] == HtbClass("br", 0x10100, 0x10001, 20_000_000, 20_000_000)
    assert classes[("ifb", 0x10101)] == HtbClass("ifb", 0x10101, 0x10001, 1_500_000, 1_500_000)
    # without a shared cell the parent is the sum: never the bottleneck
    assert classes[("br", 0x10001)].rate_bps == 120_000_000
    assert classes[("ifb", 0x10001)].rate_bps == 6_500_000
    filters = _by_type(plan, U32Filter)
    assert U32Filter("br", INGRESS_HANDLE, 1, None, None, redirect_ifname="ifb") in filters
    assert U32Filter("br", HTB_HANDLE, 1, "dst", "198.18.0.11", classid=0x10101) in filters
    assert U32Filter("ifb", HTB_HANDLE, 1, "src", "198.18.0.10", classid=0x10100) in filters
    assert len(filters) == 1 + 2 * len(LINKS)
    # order: qdiscs before classes before filters (the kernel needs parents first)
    kinds = [type(op).__name__ for op in plan.ops]
    assert kinds.index("HtbClass") > 2
    for i, op in enumerate(plan.ops):  # a leaf queue comes right after its class
        if isinstance(op, Qdisc) and op.kind == "pfifo":
            assert plan.ops[i - 1] == next(c for c in _by_type(plan, HtbClass) if (c.ifname, c.classid) == (op.ifname, op.parent))
    assert kinds.index("U32Filter") > max(i for i, k in enumerate(kinds) if k == "HtbClass")


def test_shared_capacity_caps_the_parent() -> None:
    plan = plan_cell("br", "ifb", LINKS, capacity_up_mbps=4.0, capacity_down_mbps=50.0)
    parents = {c.ifname: c for c in _by_type(plan, HtbClass) if c.classid == 0x10001}
    assert parents["br"].rate_bps == parents["br"].ceil_bps == 50_000_000
    assert parents["ifb"].rate_bps == 4_000_000
    # HTB only enforces a parent on borrowed traffic: the children's assured rates must add
    # up to at most the cap (proportional shares), their ceilings stay the radio rates
    for ifname, cap in (("br", 50_000_000), ("ifb", 4_000_000)):
        kids = [c for c in _by_type(plan, HtbClass) if c.ifname == ifname and c.classid != 0x10001]
        assert sum(c.rate_bps for c in kids) <= cap
        assert all(c.rate_bps < c.ceil_bps for c in kids)
    kids = {c.classid: c for c in _by_type(plan, HtbClass) if c.ifname == "br" and c.classid != 0x10001}
    assert kids[0x10100].ceil_bps == 20_000_000 and kids[0x10101].ceil_bps == 100_000_000
    assert kids[0x10100].rate_bps == pytest.approx(50_000_000 * 20 / 120, rel=1e-4)
    # a capacity above the sum changes nothing for the children
    roomy = plan_cell("br", "ifb", LINKS, capacity_up_mbps=100.0, capacity_down_mbps=500.0)
    assert all(c.rate_bps == c.ceil_bps for c in _by_type(roomy, HtbClass))


def test_rates_are_whole_bytes_per_second() -> None:
    assert mbps_to_bps(1.0) == 1_000_000
    assert mbps_to_bps(33.3333333) % 8 == 0
    assert mbps_to_bps(0.0001) == 8000  # floor: 1000 bytes/s


def test_plan_rates_after_a_change_touches_only_that_device_and_parent() -> None:
    plan = plan_cell("br", "ifb", LINKS)
    changed = [LINKS[0], LinkRate("dev02", "198.18.0.11", up_mbps=3.0, down_mbps=100.0)]
    new = plan_rates("br", "ifb", changed, plan.classes, None, None)
    old = set(plan.ops)
    diff = [c for c in new if c not in old and isinstance(c, HtbClass)]
    assert {(c.ifname, c.classid) for c in diff} == {("ifb", 0x10101), ("ifb", 0x10001)}
    # 1.5 -> 3 Mbit/s: the leaf queue grows from 16 to 25 packets (100 ms at 3 Mbit/s)
    assert [(q.ifname, q.limit_packets) for q in new if q not in old and isinstance(q, Qdisc)] == [("ifb", 25)]


def test_diff_plan_names_missing_and_unexpected() -> None:
    plan = plan_cell("br", "ifb", LINKS)
    observed = list(plan.ops)
    assert diff_plan(plan.ops, observed) == []
    victim = next(op for op in observed if isinstance(op, HtbClass) and op.classid == 0x10100 and op.ifname == "br")
    observed.remove(victim)
    observed.append(HtbClass("br", 0x10100, 0x10001, 10_000_000, 10_000_000))
    d = diff_plan(plan.ops, observed)
    assert len(d) == 2
    assert d[0].startswith("missing: class htb 1:100") and "rate 20 Mbit" in d[0]
    assert d[1].startswith("unexpected: class htb 1:100") and "rate 10 Mbit" in d[1]


@pytest.mark.parametrize(
    "links, msg",
    [
        ([LINKS[0], LINKS[0]], "duplicate device ids"),
        ([LinkRate("d", "198.18.0.10", 0.0, 1.0)], "rates must be > 0"),
    ],
)
def test_bad_plans_are_refused(links, msg) -> None:
    with pytest.raises(ShapingError, match=msg):
        plan_cell("br", "ifb", links)
