"""A cell across a three-node cluster on this machine, measured against issue 24's
acceptance: `cluster up` (the pulls: every node at once, or one after another), `testbed up
FILE --backend swarm` (devices per node), one run of each method (multi-stage's measured
latency against its prediction, in % of T_max), iperf3 between the edge server and a
device on a worker at 20 Mbit/s both ways, a delay/loss override seen by `ping -U`, a
worker's dockerd killed mid-run (seconds until its devices are `down` in status, how the
run ended), the node back (seconds until its devices are `up` again), `down` and `cluster
down` (seconds; what is left).

Prints one JSON document; every number is measured on this machine, the load average at
each step says how busy it was. Needs root, Docker's binaries, mosquitto, iperf3; leaves
nothing behind but the image store. Acceptance figures need a run on a machine at rest.

    sudo .venv/bin/python bench/swarm_cell.py [--file topologies/paper.yaml] [--pulls parallel|sequential]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "testbed.cli"]


def _load() -> float:
    return round(os.getloadavg()[0], 1)


def cli(*args: str, timeout: float = 1500) -> dict:
    """A `testbed ... --json` command's document (its error when it fails)."""
    r = subprocess.run([*CLI, *args, "--json"], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}",
                "exit_code": r.returncode}
    return json.loads(r.stdout)


def timed(fn, *args, **kw) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return round(time.perf_counter() - t0, 2), out


def in_container(cluster: str, node: str, testbed_node: str, argv: list[str], detach: bool = False) -> str:
    from testbed.emulation.cluster.cluster import load_plan
    from testbed.emulation.cluster.daemons import node_client

    client = node_client(load_plan(cluster)[0].node(node), timeout_s=180)
    found = client.containers.list(filters={"label": f"testbed.node={testbed_node}"})
    if not found:
        raise RuntimeError(f"no running container of {testbed_node} on {node}")
    out = found[0].exec_run(argv, detach=detach)
    return "" if detach else out.output.decode(errors="replace")


def iperf(cluster: str, run: str, device: str, host: str, rate: float) -> dict:
    cli("fault", "rate-drop", device, "--value", str(rate), "--run", run)
    got = {"rate_mbps": rate, "device": device, "device_node": host, "server_node": "n1"}
    for way, flag in (("up", []), ("down", ["-R"])):
        in_container(cluster, "n1", "server", ["iperf3", "-s", "-B", "198.18.0.1", "-1"], detach=True)
        time.sleep(1)
        doc = json.loads(in_container(cluster, host, device, ["iperf3", "-c", "198.18.0.1", "-t", "6", "-O", "1",
                                                              "-J", *flag]))
        mbps = doc["end"]["sum_received"]["bits_per_second"] / 1e6
        got[f"{way}_mbps"], got[f"{way}_ratio"] = round(mbps, 3), round(mbps / rate, 3)
    return got


def override(cluster: str, run: str, device: str, host: str, delay_ms: float, loss_pct: float) -> dict:
    cli("fault", "delay", device, "--value", str(delay_ms), "--run", run)
    cli("fault", "loss", device, "--value", str(loss_pct), "--run", run)
    ping = in_container(cluster, host, device, ["ping", "-U", "-c", "400", "-i", "0.02", "-q", "198.18.0.1"])
    stats = ping.split("rtt min/avg/max/mdev = ")[1].split()[0].split("/")
    sent, recv = (int(w) for w in [ping.split(" packets transmitted")[0].split()[-1],
                                   ping.split(" received")[0].split()[-1]])
    return {"device": device, "delay_ms_each_way": delay_ms, "loss_pct_each_way": loss_pct,
            "ping_u_rtt_ms": {"min": float(stats[0]), "avg": float(stats[1]), "max": float(stats[2])},
            "round_trip_loss": {"sent": sent, "lost": sent - recv, "expected_pct": round(100 * (1 - (1 - loss_pct / 100) ** 2), 2)}}


def lose_a_worker(cluster: str, run: str, file: Path) -> dict:
    """Stop a worker while the chain's first device computes: the one that hosts a later device
    of the chain (the run must recover), else the first's, else any (its devices idle: the run
    must complete, and they must still be `down` in status within seconds)."""
    from testbed.composition.remote_run import run_on_up_cell
    from testbed.emulation.cluster.cluster import cluster_stop_node
    from testbed.errors import RunFailedError
    from testbed.model.topology import load_topology

    state = lambda: json.loads(Path(f"/run/testbed/{run}/state.json").read_text())  # noqa: E731
    hosts = {n["id"]: n["host"] for n in state()["nodes"]}
    seen: dict = {}

    async def go():
        loop = asyncio.get_running_loop()

        def on_event(ev: dict) -> None:
            if ev.get("type") == "selection":  # a worker with a later device of the chain, else with
                chain = ev["selected"]           # its first, else any worker (then no chain device is lost)
                on_workers = [hosts[d] for d in chain[1:] + chain[:1] if hosts[d] != "n1"]
                seen["node"] = on_workers[0] if on_workers else sorted(set(hosts.values()) - {"n1"})[0]
                seen["chain_devices_lost"] = [d for d in chain if hosts[d] == seen["node"]]
            elif ev.get("type") == "downloaded" and seen.get("node") and "stop" not in seen:
                seen["stop"] = loop.create_task(stop_and_watch(seen["node"]))

        async def stop_and_watch(node: str) -> None:  # seconds from the kill until status says `down`
            lost = [d for d, h in hosts.items() if h == node]
            await cluster_stop_node(cluster, node)
            seen["stopped_at"] = t0 = time.monotonic()
            while time.monotonic() - t0 < 30:
                states = {n["id"]: n["state"] for n in (await asyncio.to_thread(state))["nodes"] if n["id"] in lost}
                if all(v == "down" for v in states.values()):
                    seen["down_after_s"] = round(time.monotonic() - t0, 2)
                    return
                await asyncio.sleep(0.05)

        try:
            outcome = await run_on_up_cell(run, load_topology(file), on_event=on_event)
        except RunFailedError as e:
            outcome = e
        if "stop" in seen:
            await seen["stop"]
        return outcome

    outcome = asyncio.run(go())
    node = seen.get("node")
    out: dict = {"node": node, "chain_devices_lost": seen.get("chain_devices_lost"), "load": _load()}
    if node is None:
        return out | {"error": "the run made no selection"}
    lost = [d for d, h in hosts.items() if h == node]
    out |= {"devices": lost, "down_in_status_after_kill_s": seen.get("down_after_s")}  # None: not within 30 s
    if isinstance(outcome, dict):
        out |= {"outcome": "completed", "recovered": outcome.get("recovered"), "relay_order": outcome["relay_order"],
                "latency_s": outcome["latency_s"]}
    else:
        out |= {"outcome": f"exit {outcome.exit_code}", "error": str(outcome)}
    out["start_node_s"], _ = timed(cli, "cluster", "start-node", node, "--name", cluster)
    t0 = time.monotonic()
    while any(n["state"] != "up" or not n.get("agent_online") for n in state()["nodes"] if n["id"] in lost):
        if time.monotonic() - t0 > 600:
            break
        time.sleep(1)
    out["back_up_and_online_after_s"] = round(time.monotonic() - t0, 1)
    return out


def method_runs(run: str, file: Path) -> dict:
    out = {}
    for method, extra in (("multistage", []), ("split", ["--tmax", "6"]), ("patch", ["--tmax", "60", "--emax", "5000"])):
        doc = cli("run", str(file), "--run", run, "--method", method, *extra)
        if "error" in doc:
            out[method] = doc
            continue
        t_max = doc["t_max_s"]
        out[method] = {"latency_s": round(doc["latency_s"], 4), "predicted_s": round(doc["predicted_latency_s"], 4),
                       "t_max_s": t_max, "relay_order": doc["relay_order"], "load": _load()}
        if method == "multistage":
            out[method] |= {"abs_error_pct_of_t_max":
                            round(100 * abs(doc["latency_s"] - doc["predicted_latency_s"]) / t_max, 2),
                            "stages": [{k: s[k] for k in ("device", "t_down_s", "t_cmp_s", "t_up_s", "overrun_s")
                                        if k in s} for s in doc["stages"]]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--file", type=Path, default=REPO / "topologies" / "paper.yaml")
    p.add_argument("--pulls", choices=("parallel", "sequential"), default="parallel")
    p.add_argument("--rate", type=float, default=20.0)
    args = p.parse_args()
    doc: dict = {"load_start": _load(), "file": str(args.file), "pulls": args.pulls}
    name, run = "b" + uuid.uuid4().hex[:5], "b" + uuid.uuid4().hex[:5]
    try:
        up_args = ["cluster", "up", "--nodes", "3", "--name", name] + (["--pull-sequentially"]
                                                                      if args.pulls == "sequential" else [])
        doc["cluster_up_s"], up = timed(cli, *up_args)
        doc["cluster_up"] = {"steps": up.get("seconds"), "pull_seconds": (up.get("image") or {}).get("pull_seconds"),
                             "load": _load(), **({"error": up["error"]} if "error" in up else {})}
        doc["testbed_up_s"], cell = timed(cli, "up", str(args.file), "--backend", "swarm", "--cluster", name, "--run",
                                          run, "--timeout", "1500")
        if "error" in cell:
            doc["testbed_up"] = cell
            return
        devices = [n for n in cell["nodes"] if n["role"] == "device"]
        doc["testbed_up"] = {"timings_s": cell.get("timings_s"), "load": _load(),
                             "devices_per_node": {h: sum(n["host"] == h for n in devices)
                                                  for h in sorted({n["host"] for n in devices})},
                             "clock_offsets_s": {n["id"]: [n.get("clock_offset_s"), n.get("clock_rtt_s")]
                                                 for n in devices}}
        doc["runs"] = method_runs(run, args.file)
        worker = next(n for n in devices if n["host"] != "n1")
        doc["iperf3"] = iperf(name, run, worker["id"], worker["host"], args.rate)
        doc["override"] = override(name, run, worker["id"], worker["host"], 20.0, 1.0)
        cli("fault", "delay", worker["id"], "--value", "0.01", "--run", run)
        cli("fault", "loss", worker["id"], "--value", "0.001", "--run", run)
        doc["node_loss"] = lose_a_worker(name, run, args.file)
    finally:
        doc["down_s"], down = timed(cli, "down", "--run", run)
        doc["down_failed"] = down.get("failed") or down.get("error")
        doc["cluster_down_s"], _ = timed(cli, "cluster", "down", "--name", name)
        from testbed.emulation.runs import run_objects

        doc["left"] = {"runs": run_objects().get(run, []), "cluster": _cluster_left(name)}
        doc["load_end"] = _load()
        print(json.dumps(doc, indent=2))


def _cluster_left(name: str) -> list[str]:
    from testbed.emulation.cluster.cluster import cluster_objects

    return cluster_objects(name)


if __name__ == "__main__":
    main()
