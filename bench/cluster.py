"""A three-node cluster on this machine, measured: image build (warm: only the checkout
layer changed), `cluster up` step by step with every node pulling the image, iperf3
between a service on the manager and a self-shaped device service on a worker through
the overlay (both directions, at each rate; optionally a delay/loss override in the
device's own namespace), the swarm noticing a stopped node, `start-node`, `down`.

Prints one JSON document (every number measured on this machine; the load average at the
start and end says how busy it was). Needs root and Docker's binaries; leaves nothing
behind but the image store. Acceptance (issue 24): up <= 60 s once the image exists,
iperf3 0.90-1.02 of the configured rate both ways; the final figures need a run on a
machine at rest.

    sudo .venv/bin/python bench/cluster.py [--nodes 3] [--rates 20] [--delay-ms 20 --loss-pct 1] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid

import docker

from testbed.emulation.cluster.cluster import (cluster_down, cluster_start_node, cluster_status, cluster_stop_node,
                                               cluster_up, load_plan)
from testbed.emulation.cluster.daemons import node_client
from testbed.emulation.cluster.image import push_image
from testbed.emulation.cluster.registry import RegistryClient, serve
from testbed.emulation.docker.image import python_bin

NETWORK_SUBNET, NETWORK_GATEWAY = "198.18.0.0/16", "198.18.255.254"  # the cell's plan, on an overlay
IPERF_S = 6


def _load() -> float:
    return os.getloadavg()[0]


def _wait_task(svc, timeout_s: float, states: tuple[str, ...] = ("complete", "failed", "rejected", "shutdown")) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        tasks = svc.tasks()
        if tasks and tasks[0]["Status"]["State"] in states:
            return tasks[0]
        if time.monotonic() > deadline:
            raise TimeoutError(f"service {svc.name}: task still {[t['Status']['State'] for t in tasks]}")
        time.sleep(1)


def _device_script(server: str, delay_ms: float, loss_pct: float) -> str:
    """What the device service runs after shaping itself: iperf3 up and down, JSON out."""
    py = python_bin()
    resolve = f"S={server}; "
    impair = ""
    if delay_ms or loss_pct:
        impair = (
            (f"iptables -A INPUT -s $S/32 -m statistic --mode random --probability {loss_pct / 100:.4f} -j DROP; "
               if loss_pct else "")
            + (f"iptables -A INPUT -s $S/32 -j NFQUEUE --queue-num 7; "
               f"(echo '{{\"op\": \"add\", \"netns\": \"/proc/self/ns/net\", \"queue\": 7, \"delay_ms\": {delay_ms}, "
               f"\"jitter_ms\": 0}}'; sleep {4 * IPERF_S + 20}) | {py} -m testbed.emulation.delayer bench >/dev/null & "
               "sleep 2; " if delay_ms else "")
            + "ping -U -c 50 -i 0.1 -q $S; "
        )
    return (resolve + impair
            + f"iperf3 -c $S --connect-timeout 5000 -t {IPERF_S} -O 1 -J > /tmp/up.json; iperf3 -c $S --connect-timeout 5000 -t {IPERF_S} -O 1 -R -J > /tmp/down.json; "
            + f"{py} -c \"import json; print('RESULT', json.dumps({{d: json.load(open(f'/tmp/{{d}}.json'))['end']"
            + "['sum_received']['bits_per_second'] / 1e6 for d in ('up', 'down')}))\"")


def make_overlay(name: str):
    """One overlay network for every measurement: removing one and making another with the
    same subnet at once fails ("Pool overlaps") while a node still tears the old one down."""
    plan, _ = load_plan(name)
    mgr = node_client(plan.manager, timeout_s=300)
    return mgr.networks.create(f"cell-{uuid.uuid4().hex[:6]}", driver="overlay", internal=True, attachable=True,
                               ipam=docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(
                                   subnet=NETWORK_SUBNET, gateway=NETWORK_GATEWAY)]))


def _remove_services(name: str, services: list) -> None:
    """Remove services and wait (bounded) until no node runs a container of them."""
    plan, _ = load_plan(name)
    ids = [s.id for s in services if s is not None]
    for s in services:
        if s is not None:
            s.remove()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        left = [c for n in plan.nodes for sid in ids
                for c in node_client(n).containers.list(all=True, filters={"label": f"com.docker.swarm.service.id={sid}"})]
        if not left:
            return
        time.sleep(0.5)


def overlay_iperf(name: str, net, rate: float, delay_ms: float = 0.0, loss_pct: float = 0.0) -> dict:
    """iperf3 from a device service on n2 (shaped to `rate` both ways in its own namespace)
    to an iperf3 server service on the manager, over the overlay network `net`."""
    plan, state = load_plan(name)
    ref = state["image"]["ref"]
    mgr = node_client(plan.manager, timeout_s=300)
    tag = uuid.uuid4().hex[:6]
    common = dict(networks=[net.id], restart_policy=docker.types.RestartPolicy(condition="none"),
                  endpoint_spec=docker.types.EndpointSpec(mode="dnsrr"),
                  sysctls={"net.ipv4.tcp_congestion_control": "reno"})  # as the netns backend does under impairments
    server = device = None
    try:
        server = mgr.services.create(ref, ["iperf3", "-s"], name=f"srv-{tag}", constraints=["node.labels.testbed.node==n1"],
                                     **common)
        srv_task = _wait_task(server, 300, ("running", "failed", "rejected"))
        # its address from the manager: a name reaches a worker's resolver by gossip, a moment later
        srv_ip = srv_task["NetworksAttachments"][0]["Addresses"][0].split("/")[0]
        device = mgr.services.create(
            ref, [python_bin(), "-m", "testbed.emulation.docker.selfshape", "--up-mbps", str(rate), "--down-mbps",
                  str(rate), "--", "sh", "-c", _device_script(srv_ip, delay_ms, loss_pct)],
            name=f"dev-{tag}", constraints=["node.labels.testbed.node==n2"], cap_add=["NET_ADMIN"], **common)
        try:
            task = _wait_task(device, 240)  # a first pull on the worker, then 2 x IPERF_S
        finally:
            logs = b"".join(device.logs(stdout=True, stderr=True)).decode(errors="replace")
        if task["Status"]["State"] != "complete" or "RESULT " not in logs:
            raise RuntimeError(f"device task {task['Status']}: {logs[-1500:]}")
        got = json.loads(logs.rsplit("RESULT ", 1)[1].splitlines()[0])
        out = {"rate_mbps": rate, "delay_ms": delay_ms, "loss_pct": loss_pct,
               "up_mbps": round(got["up"], 3), "down_mbps": round(got["down"], 3),
               "up_ratio": round(got["up"] / rate, 3), "down_ratio": round(got["down"] / rate, 3)}
        pings = [ln.split("|", 1)[-1].strip() for ln in logs.splitlines() if "rtt min/avg" in ln or "packet loss" in ln]
        if pings:
            out["ping_u"] = pings
        return out
    finally:
        _remove_services(name, [device, server])


async def main_async(args: argparse.Namespace) -> dict:
    doc: dict = {"load_start": _load(), "nodes": args.nodes}
    t0 = time.perf_counter()
    with serve() as url:
        img = push_image(RegistryClient(url))
    doc["image_build"] = {"seconds": round(time.perf_counter() - t0, 2), "size_bytes": img.size_bytes,
                          "layers": img.layers}
    name = "b" + uuid.uuid4().hex[:5]
    try:
        t0 = time.perf_counter()
        up = await cluster_up(name, args.nodes, pull=True)
        doc["up"] = {"seconds": round(time.perf_counter() - t0, 2), "steps": up["seconds"],
                     "pull_seconds": up["image"]["pull_seconds"], "load": _load()}
        net = await asyncio.to_thread(make_overlay, name)
        doc["iperf"] = [await asyncio.to_thread(overlay_iperf, name, net, r) for r in args.rates]
        if args.delay_ms or args.loss_pct:
            doc["iperf"].append(await asyncio.to_thread(overlay_iperf, name, net, args.rates[0], args.delay_ms,
                                                        args.loss_pct))
        net.remove()
        worker = f"n{args.nodes}"
        await cluster_stop_node(name, worker)
        t1 = time.monotonic()
        while (await cluster_status(name))["nodes"][-1]["swarm_state"] != "down":
            if time.monotonic() - t1 > 30:
                break
            await asyncio.sleep(0.2)
        doc["swarm_sees_down_s"] = round(time.monotonic() - t1, 2)
        doc["start_node_s"] = (await cluster_start_node(name, worker))["seconds"]
    finally:
        t0 = time.perf_counter()
        await cluster_down(name)
        doc["down_s"] = round(time.perf_counter() - t0, 2)
    doc["load_end"] = _load()
    return doc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--rates", type=float, nargs="+", default=[20.0])
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--loss-pct", type=float, default=0.0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    doc = asyncio.run(main_async(args))
    print(json.dumps(doc, indent=2 if not args.json else None))
    sys.exit(0)


if __name__ == "__main__":
    main()
