"""A Swarm cell's pure parts, without root or docker: placement, a device's own shaping
plan, the control plane's topics and ACL, the keeper's secret, the clock estimate and its
injected skew, and the CLI's checks before anything is made."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from testbed.composition.cells import MadeCell
from testbed.composition.supervisor import cell_source
from testbed.composition.device_clock import SKEW_ENV, device_time, discipline, parse_skews
from testbed.composition.swarm_cells import AGENT_KEEPALIVE_S, keeper_secret
from testbed.emulation.cell import NodeState
from testbed.emulation.cluster.device_link import DEVICE_CLASS, plan_device, rate_ops
from testbed.emulation.cluster.swarm_backend import spread
from testbed.emulation.cluster.swarm_cell import ClockSample, best_offset
from testbed.emulation.shaping import HtbClass, Qdisc, U32Filter, queue_packets
from testbed.errors import InputError, ShapingError
from testbed.model.impairments import link_impairments
from testbed.model.radio import compute_links
from testbed.model.topology import load_topology, parse_topology, place
from testbed.relay import security, topics
from testbed.cli.app import main

REPO = Path(__file__).resolve().parent.parent


def test_spread_puts_devices_round_robin_from_the_first_worker_and_keeps_placements() -> None:
    devs = [f"dev{i:02d}" for i in range(1, 21)]
    hosts = spread(devs, ["n1", "n2", "n3"])
    counts = {n: list(hosts.values()).count(n) for n in ("n1", "n2", "n3")}
    assert counts == {"n1": 6, "n2": 7, "n3": 7}  # paper.yaml: at least 5 on each worker
    assert hosts["dev01"] == "n2" and hosts["dev02"] == "n3" and hosts["dev03"] == "n1"
    pinned = spread(devs[:4], ["n1", "n2", "n3"], {"dev02": "n1"})
    assert pinned == {"dev01": "n2", "dev02": "n1", "dev03": "n3", "dev04": "n1"}
    with pytest.raises(InputError, match="n9"):
        spread(devs, ["n1", "n2"], {"dev01": "n9"})


def test_placement_in_a_topology() -> None:
    topo = parse_topology(json.dumps({"name": "t", "devices": {"list": [
        {"id": "a", "placement": "n2"}, {"id": "b"}]}}))
    assert topo.placements() == {"a": "n2"}
    with pytest.raises(Exception, match="placement"):
        parse_topology(json.dumps({"name": "t", "devices": {"list": [{"id": "a", "placement": "no/such"}]}}))


def test_a_devices_own_link_plan_shapes_both_directions_behind_queues() -> None:
    ops = plan_device("eth0", "ifb0", 20.0, 50.0)
    classes = {op.ifname: op for op in ops if isinstance(op, HtbClass)}
    assert classes["eth0"].rate_bps == classes["eth0"].ceil_bps == 20_000_000  # egress: the uplink
    assert classes["ifb0"].rate_bps == 50_000_000  # ingress through the IFB: the downlink
    leaves = {op.ifname: op for op in ops if isinstance(op, Qdisc) and op.kind == "pfifo"}
    assert leaves["eth0"].limit_packets == queue_packets(20_000_000) and leaves["eth0"].parent == DEVICE_CLASS
    redirect = [op for op in ops if isinstance(op, U32Filter) and op.redirect_ifname]
    assert [(r.ifname, r.redirect_ifname) for r in redirect] == [("eth0", "ifb0")]
    # what a rate change replaces: the classes and their leaves, nothing structural
    assert all(isinstance(op, HtbClass | Qdisc) and (not isinstance(op, Qdisc) or op.kind == "pfifo")
               for op in rate_ops("eth0", "ifb0", 5, 5))
    with pytest.raises(ShapingError):
        plan_device("eth0", "ifb0", 0, 5)


def test_control_topics_and_acl_keep_each_keeper_to_its_own() -> None:
    assert topics.control("r1", "dev01", "cmd") == "tb/r1/ctl/dev01/cmd"
    assert topics.parse_control_topic("r1", "tb/r1/ctl/dev01/state") == ("dev01", "state")
    assert topics.parse_control_topic("r1", "tb/r1/dev/dev01/status") is None
    assert topics.parse_control_topic("r2", "tb/r1/ctl/dev01/state") is None
    with pytest.raises(ValueError):
        topics.control("r1", "dev01", "task")
    creds = security.make_control_credentials("r1", ["dev01", "dev02"])
    assert creds.keepers["dev01"].username == "keeper.dev01" and creds.control.username == "control"
    assert len({c.password for c in creds.accounts()}) == 3
    acl = security.control_acl_text(creds)
    blocks = {b.splitlines()[0]: b.splitlines()[1:] for b in acl.strip().split("\n\n")}
    assert blocks["user keeper.dev01"] == ["topic read tb/r1/ctl/dev01/cmd", "topic write tb/r1/ctl/dev01/reply",
                                           "topic write tb/r1/ctl/dev01/state"]
    assert "topic write tb/r1/ctl/+/cmd" in blocks["user control"]
    assert not any("dev/" in line for lines in blocks.values() for line in lines)  # nothing of the relay's topics
    # no device account exists on the control broker: an agent cannot log in there
    assert set(blocks) == {"user control", "user keeper.dev01", "user keeper.dev02"}


def test_control_files_are_private(tmp_path: Path) -> None:
    creds = security.make_control_credentials("r1", ["dev01"])
    paths = security.write_control_files(tmp_path, creds)
    for p in paths.values():
        assert p.stat().st_mode & 0o777 == 0o600
    assert creds.control.password not in paths["password_file"].read_text()  # hashed


def test_the_undertaker_may_only_say_offline_on_the_cell_broker(tmp_path: Path) -> None:
    cell = security.make_credentials("r1", ["dev01"])
    paths = security.write_security_files(tmp_path, cell, "198.18.0.1", 1883)
    ctl = security.make_control_credentials("r1", ["dev01"])
    before = paths["acl_file"].read_text()
    security.grant_undertaker(paths, ctl)
    acl = paths["acl_file"].read_text()
    assert acl.startswith(before) and acl[len(before):].split() == ["user", "control", "topic", "write",
                                                                     "tb/r1/dev/+/status"]
    users = [line.split(":")[0] for line in paths["password_file"].read_text().splitlines()]
    assert users.count("control") == 1 and "dev01" in users
    assert paths["acl_file"].stat().st_mode & 0o777 == 0o600


def test_a_keeper_secret_holds_its_own_device_only() -> None:
    topo = load_topology(REPO / "topologies" / "small.yaml")
    links = compute_links(topo, place(topo))
    creds = security.make_credentials("r1", [lk.id for lk in links])
    ctl = security.make_control_credentials("r1", [lk.id for lk in links])
    imps = link_impairments(topo, links)
    doc = keeper_secret(topo, links[0], "r1", creds, ctl, "198.19.128.2", 2_000_900_000, imps[links[0].id], 1 << 20)
    text = json.dumps(doc)
    others = [c.password for d, c in creds.devices.items() if d != links[0].id]
    others += [c.password for d, c in ctl.keepers.items() if d != links[0].id] + [ctl.control.password,
                                                                                    creds.server.password]
    assert not any(p in text for p in others)
    assert doc["agent"]["password"] == creds.devices[links[0].id].password
    assert doc["control"]["username"] == "keeper." + links[0].id
    assert doc["agent"]["keepalive_s"] == AGENT_KEEPALIVE_S and doc["agent"]["broker_host"] == "198.18.0.1"
    assert doc["link"]["up_mbps"] == links[0].rate_up_mbps


def test_the_clock_estimate_takes_the_shortest_round_trip() -> None:
    # the device is 7.5 s ahead; replies read at varying points of each round trip
    samples = [ClockSample(100.0, 107.5 + 0.040, 100.1), ClockSample(200.0, 207.5 + 0.002, 200.004),
               ClockSample(300.0, 307.5 + 0.001, 300.3)]
    best = best_offset(samples)
    assert best.rtt_s == pytest.approx(0.004)
    assert abs(best.offset_s - 7.5) <= best.rtt_s / 2


def test_an_injected_skew_and_its_correction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SKEW_ENV, "7.5")
    assert device_time() - time.time() == pytest.approx(7.5, abs=0.01)
    real = time.time
    try:
        discipline(7.5)  # the measured offset: the disciplined clock reads the reference again
        assert time.time() - real() == pytest.approx(0.0, abs=0.01)
    finally:
        monkeypatch.setattr(time, "time", real)
    assert parse_skews("dev01=7.5, dev02=-3") == {"dev01": 7.5, "dev02": -3.0}
    with pytest.raises(InputError):
        parse_skews("dev01")


def test_node_state_carries_its_host_and_clock() -> None:
    n = NodeState("dev01", "device", None, "198.18.128.4", 1.0, 2.0, 1.0, 512, "p", 0.0, 0.0, host="n2",
                  clock_offset_s=0.001, clock_rtt_s=0.004)
    doc = n.to_json()
    assert doc["host"] == "n2" and doc["clock_offset_s"] == 0.001
    assert NodeState.from_json(doc) == n
    assert "clock_offset_s" not in NodeState("s", "server", None, None, None, None, None, None, "", 0, 0).to_json()


def test_cell_source_by_backend() -> None:
    assert isinstance(cell_source("r1", backend="docker"), MadeCell)
    assert type(cell_source("r1", backend="swarm", cluster="c1")).__name__ == "SwarmCell"
    with pytest.raises(InputError, match="--cluster"):
        cell_source("r1", backend="swarm")
    with pytest.raises(InputError, match="swarm"):
        cell_source("r1", backend="netns", cluster="c1")


def test_up_checks_the_cluster_before_anything(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["up", str(REPO / "topologies" / "small.yaml"), "--backend", "swarm"])
    assert e.value.code == 2 and "--cluster" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["up", str(REPO / "topologies" / "small.yaml"), "--backend", "swarm", "--cluster", "nosuch7"])
    assert e.value.code == 4 and "cluster up" in capsys.readouterr().err
