"""The impairment mechanics without root: the netem plan, the iptables chain, the
nfnetlink_queue messages and the delayer's holding logic (fake sockets)."""

from __future__ import annotations

import struct

import pytest

from testbed.emulation.delayer import Delayer
from testbed.emulation.impair import CHAIN, NetemLeaf, chain_rules, plan_netem, remove_chain_rules, replaced_pfifos
from testbed.emulation.nfqueue import COPY_RANGE, QueuedPacket, config_message, flow_key, parse_messages, verdict_message
from testbed.emulation.shaping import LinkRate, Qdisc, plan_cell
from testbed.model.impairments import Impairment, LinkImpairment

# -- netem ------------------------------------------------------------------------------------


def cell():
    return plan_cell("br", "ifb", [LinkRate("dev01", "198.18.0.10", 20, 50), LinkRate("dev02", "198.18.0.11", 20, 50)])


def test_netem_leaves_replace_the_impaired_devices_pfifos_in_both_directions():
    plan = cell()
    rates = {"dev01": (20.0, 50.0), "dev02": (20.0, 50.0)}
    leaves = plan_netem(plan, {"dev01": LinkImpairment.symmetric(20, 0, 2), "dev02": LinkImpairment()}, rates)
    assert {(x.ifname, x.parent) for x in leaves} == {("br", plan.classes["dev01"]), ("ifb", plan.classes["dev01"])}
    down = next(x for x in leaves if x.ifname == "br")
    assert (down.delay_us, down.jitter_us, down.loss_pct, down.rate_bps) == (20000, 0, 2, None)
    # the 100 ms queue at 50 Mbit/s (413 frames) plus 20 ms in flight (83 frames)
    assert down.limit_packets == 413 + 83
    assert down.handle >> 16 != plan.classes["dev01"] & 0xFFFF  # its own handle: `replace` grafts it
    gone = replaced_pfifos(plan.ops, leaves)
    assert {(q.ifname, q.parent) for q in gone} == {("br", plan.classes["dev01"]), ("ifb", plan.classes["dev01"])}
    assert all(isinstance(q, Qdisc) and q.kind == "pfifo" for q in gone)


def test_netem_with_jitter_keeps_flows_in_order_by_rate():
    plan = cell()
    (leaf, _) = plan_netem(plan, {"dev02": LinkImpairment.symmetric(10, 3, 0)}, {"dev02": (20.0, 50.0)})
    assert leaf.jitter_us == 3000 and leaf.rate_bps == 50_000_000
    assert "netem" in leaf.describe() and isinstance(leaf, NetemLeaf)


# -- iptables --------------------------------------------------------------------------------------


def test_chain_rules_drop_then_queue_per_source():
    text = chain_rules([("198.18.0.10", Impairment(20, 0, 2), 1), ("198.18.0.11", Impairment(0, 0, 1), 2),
                        ("198.18.0.12", Impairment(), 3)], hook=True)
    lines = text.splitlines()
    assert lines[:2] == ["*filter", f":{CHAIN} - [0:0]"] and lines[-1] == "COMMIT"
    assert f"-A {CHAIN} -s 198.18.0.10/32 -m statistic --mode random --probability 0.0200000000 -j DROP" in lines
    assert f"-A {CHAIN} -s 198.18.0.10/32 -j NFQUEUE --queue-num 1" in lines
    assert not any("198.18.0.11/32 -j NFQUEUE" in x for x in lines)  # loss only: no trip through the delayer
    assert not any("198.18.0.12" in x for x in lines)
    assert lines.index(f"-I INPUT 1 -j {CHAIN}") > 1
    assert "INPUT" not in chain_rules([], hook=False)
    assert f"-X {CHAIN}" in remove_chain_rules() and f"-D INPUT -j {CHAIN}" in remove_chain_rules()


# -- nfnetlink_queue ------------------------------------------------------------------------------


def _packet_message(queue: int, packet_id: int, head: bytes) -> bytes:
    def attr(kind: int, payload: bytes) -> bytes:
        n = 4 + len(payload)
        return struct.pack("=HH", n, kind) + payload + b"\0" * (-n % 4)

    body = struct.pack("!BBH", 2, 0, queue) + attr(1, struct.pack("!IHB", packet_id, 0x0800, 1)) + attr(10, head)
    return struct.pack("=IHHII", 16 + len(body), (3 << 8) | 0, 0, 0, 0) + body


def ipv4_tcp(src: str, dst: str, sport: int, dport: int) -> bytes:
    import socket

    return (bytes([0x45, 0]) + struct.pack("!H", 1500) + b"\0" * 5 + bytes([6]) + b"\0\0"
            + socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport) + b"\0" * 16)


def test_parse_queued_packets_and_acks():
    head = ipv4_tcp("198.18.0.10", "198.18.0.1", 40000, 1883)
    buf = _packet_message(3, 77, head) + _packet_message(3, 78, head)
    ack = struct.pack("=IHHII", 36, 2, 0, 5, 0) + struct.pack("=i", -16) + b"\0" * 16
    items = list(parse_messages(buf + ack))
    assert items[:2] == [QueuedPacket(3, 77, head), QueuedPacket(3, 78, head)]
    assert items[2] == (5, 16)  # EBUSY: another process holds the queue


def test_config_and_verdict_messages_are_well_formed():
    msg = config_message(7, seq=9)
    length, mtype, flags, seq, _ = struct.unpack_from("=IHHII", msg)
    assert length == len(msg) and mtype == (3 << 8) | 2 and flags == 1 | 4 and seq == 9
    assert struct.unpack_from("!H", msg, 18)[0] == 7  # res_id: the queue
    assert struct.pack("!IB", COPY_RANGE, 2) in msg
    v = verdict_message(7, 1234)
    assert struct.unpack_from("=I", v)[0] == len(v) and v.endswith(struct.pack("!II", 1, 1234))


def test_flow_key_is_protocol_addresses_and_ports():
    a = ipv4_tcp("198.18.0.10", "198.18.0.1", 40000, 1883)
    assert flow_key(a) == flow_key(a[:24] + b"x" * 40)
    assert flow_key(a) != flow_key(ipv4_tcp("198.18.0.10", "198.18.0.1", 40001, 1883))


# -- the delayer's holding logic ----------------------------------------------------------------


class FakeQueue:
    def __init__(self) -> None:
        self.waiting: list[QueuedPacket] = []
        self.accepted: list[tuple[int, int]] = []

    def read(self) -> list[QueuedPacket]:
        out, self.waiting = self.waiting, []
        return out

    def accept(self, items: list[tuple[int, int]]) -> None:
        self.accepted += items


def delayer_with(delay_s: float, jitter_s: float) -> tuple[Delayer, FakeQueue]:
    d, q = Delayer(), FakeQueue()
    d.sockets["ns"] = q
    d.queues[("ns", 0)] = (delay_s, jitter_s)
    return d, q


def test_holds_each_packet_until_it_is_due():
    d, q = delayer_with(0.020, 0.0)
    q.waiting = [QueuedPacket(0, i, ipv4_tcp("198.18.0.1", "198.18.0.10", 1883, 40000)) for i in range(3)]
    d.receive("ns", now=100.0)
    d.release(100.019)
    assert q.accepted == []
    d.release(100.020)
    assert q.accepted == [(0, 0), (0, 1), (0, 2)]
    assert d.stats()["packets"] == 3 and d.stats()["held"] == 0


def test_jitter_never_reorders_a_flow_and_stays_in_bounds():
    d, q = delayer_with(0.020, 0.010)
    flow_a = ipv4_tcp("198.18.0.1", "198.18.0.10", 1883, 40000)
    flow_b = ipv4_tcp("198.18.0.1", "198.18.0.10", 1883, 40001)
    for i in range(400):
        q.waiting = [QueuedPacket(0, i, flow_a if i % 2 == 0 else flow_b)]
        d.receive("ns", now=100.0 + i * 1e-4)
    due = sorted((item[0], item[4]) for item in d._heap)
    assert all(100.010 <= t <= 100.0 + 400e-4 + 0.030 for t, _ in due)
    d.release(200.0)
    order = [pid for _, pid in q.accepted]
    for parity in (0, 1):
        flow = [pid for pid in order if pid % 2 == parity]
        assert flow == sorted(flow)
    assert order != sorted(order)  # the two flows did interleave differently: jitter is real


def test_bad_commands_are_answered_not_fatal():
    d, _ = delayer_with(0.01, 0.0)
    assert d._command(b'{"op": "set", "netns": "ns", "queue": 0, "delay_ms": 5, "jitter_ms": 9}')["ok"] is False
    assert d._command(b'{"op": "launch"}')["ok"] is False
    assert d._command(b"not json")["ok"] is False
    assert d._command(b'{"op": "set", "netns": "ns", "queue": 0, "delay_ms": 5}') == {"ok": True}
    assert d.queues[("ns", 0)] == (0.005, 0.0)
    assert {"packets", "cpu_s", "late_us_mean"} <= set(d._command(b'{"op": "stats"}'))


async def test_impairer_netem_path_grafts_regrafts_and_restores(monkeypatch):
    """The netem path's bookkeeping, with the pyroute2 calls captured (no sch_netem here)."""
    from testbed.emulation import impair
    from testbed.emulation.impair import ImpairedLink, Impairer
    from testbed.emulation.shaping import plan_rates

    calls: list[tuple[list, list]] = []

    async def fake_apply(netns, leaves, restore=()):
        calls.append((list(leaves), list(restore)))

    async def no_cc(self):
        self.congestion_control = "reno"

    monkeypatch.setattr(impair, "_apply_netem", fake_apply)
    monkeypatch.setattr(Impairer, "_set_congestion_control", no_cc)
    plan = cell()
    links = [ImpairedLink("dev01", "198.18.0.10", "ns1", 0), ImpairedLink("dev02", "198.18.0.11", "ns2", 1)]
    imp = Impairer("r1", "nss", "198.18.0.1", links, netem_available=True, shaping=plan)
    rates = {"dev01": (20.0, 50.0), "dev02": (20.0, 50.0)}
    await imp.apply({"dev01": LinkImpairment.symmetric(20, 0, 1), "dev02": LinkImpairment()}, rates)
    assert imp.path == "netem" and imp.delayer is None
    leaves, restore = calls[-1]
    assert len(leaves) == 2 and restore == []
    in_kernel = imp.shaping_ops_in_kernel(plan.ops)
    assert len(in_kernel) == len(plan.ops) - 2  # dev01's two pfifos are netem now
    # a rate change replaces the pfifo leaves: netem goes back on, sized for the new rate
    slower = {"dev01": (5.0, 5.0), "dev02": (20.0, 50.0)}
    new_ops = plan_rates("br", "ifb", [LinkRate(d, f"198.18.0.1{i}", u, dn) for i, (d, (u, dn)) in enumerate(slower.items())],
                         plan.classes, None, None)
    keyed = {(type(o).__name__, o.ifname, getattr(o, "classid", getattr(o, "handle", None))): o for o in new_ops}
    plan2 = type(plan)(plan.down_ifname, plan.up_ifname,
                       tuple(keyed.get((type(o).__name__, o.ifname, getattr(o, "classid", getattr(o, "handle", None))), o)
                             for o in plan.ops), plan.classes)
    await imp.after_rate_change(slower, plan2)
    leaves2, _ = calls[-1]
    assert max(x.limit_packets for x in leaves2) < min(x.limit_packets for x in leaves)
    # clearing the impairment puts the plain pfifo back in both directions
    await imp.apply({"dev01": LinkImpairment()}, slower)
    leaves3, restore3 = calls[-1]
    assert leaves3 == [] and {(q.ifname, q.parent) for q in restore3} == {("br", plan.classes["dev01"]),
                                                                           ("ifb", plan.classes["dev01"])}
    assert imp.shaping_ops_in_kernel(plan2.ops) == list(plan2.ops)
    assert imp.status()["devices"] == {}


def test_the_delayer_uses_its_own_namespace_without_setns(monkeypatch):
    """Inside a device container (Swarm) the delayer has NET_ADMIN but not SYS_ADMIN: its
    own namespace must not be entered with setns."""
    from testbed.emulation import nsutil

    made = []

    class OwnQueue:
        def __init__(self):
            made.append(self)

        def configure(self, queue):
            self.queue = queue

    monkeypatch.setattr(nsutil, "in_netns", lambda *a: pytest.fail("setns into its own namespace"))
    d = Delayer()
    d._socket_type = OwnQueue
    d.configure("add", "/proc/self/ns/net", 3, 5.0, 0.0)
    assert len(made) == 1 and made[0].queue == 3 and d.queues[("/proc/self/ns/net", 3)] == (0.005, 0.0)
