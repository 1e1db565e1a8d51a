"""Link impairments (issue 14), measured side by side; needs root, leaves nothing behind.

1. added delay and loss vs configured: `ping -U` RTT (user-to-user: plain ping timestamps
   replies before netfilter holds them) and ping loss from the server's namespace, vs
   2 x delay_ms and 1 - (1 - loss)^2;
2. the delayer's cost: iperf3 through a 20 ms link at 10, 50 and 100 Mbit/s (downlink;
   data and ACKs both pass the delayer): its CPU seconds per second of traffic (of one
   core) and the packets per second it holds and releases;
3. transfer prediction: 256 KB messages, each the first on its TCP connection (as a relay
   stage's latent is on its agent's MQTT connection: the window starts from the initial
   one), one way (first byte sent -> last byte received), vs the cost model
   (selection/transfer.py) over delay {5, 20, 50} ms x loss {0, 0.5, 2} %, at 100 Mbit/s;
4. radio: topologies/paper-radio.yaml, the cell-edge device (lowest SNR) and the central
   one (highest): measured and predicted 256 KB transfers, with and without the
   radio-derived impairments;
5. grid (issue 23): the transfer-time *distributions* (selection/stochastic.py) against
   the relay's own transfers on a warm lossy cell (topologies/lossy-grid.yaml: three
   delay/loss combinations): `testbed up`, then `testbed run --run ID` again and again,
   each run's measured t_down_s / t_up_s from result.json and the kernel's counters
   (`nstat` in every namespace: TcpRetransSegs, TcpExtTCPLossProbes, TcpExtTCPTimeouts)
   around it. Printed per grid point and pooled: bias (mean measured / mean predicted - 1,
   95 % bootstrap interval over runs), calibration (share inside the predicted p10-p90,
   share below p50), the point model's bias beside it, and how often a *correct* model
   would pass issue 23's checks with these very transfers (selection/checks.py). Each
   transfer is judged against the distribution its run recorded (result.json's
   `predicted`: the plan's connection counts and delay path; `--per-pass-ms` recounts
   instead); `--grid-topology topologies/paper-radio.yaml` runs the same on the paper's
   radio-derived cell;
6. confidence (issue 23): chance-constrained plans on a warm lossy cell
   (topologies/lossy-confidence.yaml): every connection warmed by `--warmup` loose runs,
   then `--confidence-runs` runs of the mean-based plan and of `--confidence 0.9`, in
   turn, at a T_max where the mean-based plan is tight by its own point model; the share
   of each within T_max (measured, Wilson interval), beside the plans' modelled
   probability and how often a right implementation would pass ">= 80 % within"
   (Monte-Carlo over the runs' own modelled probabilities).

    sudo .venv/bin/python bench/links.py [--messages 8] [--only ping,cost,predict] [--json]
    sudo .venv/bin/python bench/links.py --only grid [--runs 30] [--save grid.json]
    sudo .venv/bin/python bench/links.py --only confidence [--confidence-runs 40] [--save c.json]
    .venv/bin/python bench/links.py --from grid.json          # analyse a saved grid (or confidence) run again
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PAYLOAD_BYTES = 262144
GRID_TOPOLOGY = REPO / "topologies/lossy-grid.yaml"
CONFIDENCE_TOPOLOGY = REPO / "topologies/lossy-confidence.yaml"
NSTAT_COUNTERS = ("TcpRetransSegs", "TcpExtTCPLossProbes", "TcpExtTCPTimeouts", "TcpExtTCPSackRecovery",
                  "TcpOutSegs")
PORT = 5611
IPERF_PORT = 5612
GRID_DELAY_MS = (5, 20, 50)
GRID_LOSS_PCT = (0, 0.5, 2)
RATE_MBPS = 100.0
_HEAD = struct.Struct("!dI")  # send time (epoch s), payload length


# --- message peers (run inside the namespaces) -------------------------------------------
def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(1 << 20, n - len(buf)))
        if not chunk:
            raise ConnectionError("peer closed")
        buf += chunk
    return bytes(buf)


def sink(address: str, count: int) -> None:
    """Receive `count` messages, one per connection; print each one's one-way time."""
    ls = socket.create_server((address, PORT))
    ls.settimeout(60)
    times = []
    for _ in range(count):
        conn, _ = ls.accept()
        conn.settimeout(120)
        t_sent, n = _HEAD.unpack(_recv_exact(conn, _HEAD.size))
        _recv_exact(conn, n)
        times.append(time.time() - t_sent)
        conn.sendall(b"k")
        conn.close()
    print(json.dumps(times))


def source(address: str, count: int, gap_s: float) -> None:
    payload = b"\0" * PAYLOAD_BYTES
    for _ in range(count):
        time.sleep(gap_s)
        s = socket.create_connection((address, PORT), timeout=60)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(120)
        s.sendall(_HEAD.pack(time.time(), PAYLOAD_BYTES) + payload)
        _recv_exact(s, 1)
        s.close()


# --- driver ------------------------------------------------------------------------------
def _ns(ns: str, *argv: str) -> list[str]:
    return ["nsenter", f"--net={ns}", *argv]


def _wait_listen(ns: str, port: int) -> None:
    for _ in range(200):
        if subprocess.run(_ns(ns, "ss", "-ltnH", f"sport = :{port}"), capture_output=True, text=True).stdout.strip():
            return
        time.sleep(0.03)
    raise RuntimeError(f"nothing listens on :{port} in {ns}")


def one_way_times(rx_ns: str, rx_addr: str, tx_ns: str, count: int, gap_s: float = 0.1) -> list[float]:
    me = os.path.abspath(__file__)
    rx = subprocess.Popen(_ns(rx_ns, sys.executable, me, "--sink", rx_addr, "--count", str(count)),
                          stdout=subprocess.PIPE, text=True)
    try:
        _wait_listen(rx_ns, PORT)
        subprocess.run(_ns(tx_ns, sys.executable, me, "--source", rx_addr, "--count", str(count), "--gap", str(gap_s)),
                       check=True, timeout=600)
        out, _ = rx.communicate(timeout=60)
        return json.loads(out)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()


def ping(server_ns: str, address: str, count: int, interval_s: float = 0.005) -> tuple[float, int]:
    """(mean RTT ms, packets lost) of `ping -U` from the server's namespace."""
    r = subprocess.run(_ns(server_ns, "ping", "-U", "-q", "-c", str(count), "-i", str(interval_s), "-W", "2", address),
                       capture_output=True, text=True, timeout=count * interval_s + 60)
    sent, got = map(int, re.search(r"(\d+) packets transmitted, (\d+) received", r.stdout).groups())
    m = re.search(r"= [\d.]+/([\d.]+)/", r.stdout)
    return (float(m.group(1)) if m else float("nan")), sent - got


def iperf_mbps(server_ns: str, dev_ns: str, dev_addr: str, seconds: float) -> float:
    """Downlink goodput (server -> device) in Mbit/s."""
    srv = subprocess.Popen(_ns(dev_ns, "iperf3", "-s", "-1", "-B", dev_addr, "-p", str(IPERF_PORT)),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listen(dev_ns, IPERF_PORT)
        r = subprocess.run(_ns(server_ns, "iperf3", "-c", dev_addr, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"),
                           capture_output=True, text=True, timeout=seconds + 30)
        return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
    finally:
        srv.kill()
        srv.wait()


def _topology(delay_ms: float, loss_pct: float, rate_mbps: float):
    from testbed.model.topology import parse_topology

    return parse_topology(
        "name: bench-links\ndevices:\n  list:\n    - {id: dev01, position: {x_m: 300, y_m: 250}}\n"
        f"radio: {{los: los, rate_cap_mbps: {rate_mbps}}}\n"
        f"links: {{delay_ms: {delay_ms}, loss_pct: {loss_pct}}}\n")


async def bench_ping(count: int) -> list[dict]:
    from testbed.emulation import Emulation

    rows = []
    for delay, loss in ((20, 0), (20, 2), (5, 0.5)):
        async with Emulation(_topology(delay, loss, RATE_MBPS), "l" + uuid.uuid4().hex[:5], cgroups=False) as emu:
            rtt, lost = await asyncio.to_thread(ping, emu.nodes["server"].netns, emu.nodes["dev01"].address, count)
        rows.append({"delay_ms": delay, "loss_pct": loss, "rtt_configured_ms": 2 * delay, "rtt_measured_ms": rtt,
                     "loss_configured": 1 - (1 - loss / 100) ** 2, "loss_measured": lost / count, "packets": count})
    return rows


async def bench_cost(seconds: float) -> list[dict]:
    from testbed.emulation import Emulation

    rows = []
    for rate in (10, 50, 100):
        async with Emulation(_topology(20, 0, rate), "l" + uuid.uuid4().hex[:5], cgroups=False) as emu:
            dev = emu.nodes["dev01"]
            before = await asyncio.to_thread(emu.impair.delayer_stats)
            t0 = time.monotonic()
            mbps = await asyncio.to_thread(iperf_mbps, emu.nodes["server"].netns, dev.netns, dev.address, seconds)
            wall = time.monotonic() - t0
            after = await asyncio.to_thread(emu.impair.delayer_stats)
        rows.append({"rate_mbps": rate, "goodput_mbps": mbps, "wall_s": wall,
                     "cpu_share": (after["cpu_s"] - before["cpu_s"]) / wall,
                     "packets_per_s": (after["packets"] - before["packets"]) / wall,
                     "late_us_mean": after["late_us_mean"], "scheduling": after["scheduling"]})
    return rows


async def bench_predict(messages: int) -> list[dict]:
    from testbed.emulation import Emulation
    from testbed.model.impairments import Impairment
    from testbed.selection.costs import DEFAULT_LINK_EFFICIENCY
    from testbed.selection.transfer import tcp_transfer_time_s

    rows = []
    for delay in GRID_DELAY_MS:
        for loss in GRID_LOSS_PCT:
            topo = _topology(delay, loss, RATE_MBPS)
            async with Emulation(topo, "l" + uuid.uuid4().hex[:5], cgroups=False) as emu:
                server, dev = emu.nodes["server"], emu.nodes["dev01"]
                down = await asyncio.to_thread(one_way_times, dev.netns, dev.address, server.netns, messages)
                up = await asyncio.to_thread(one_way_times, server.netns, server.address, dev.netns, messages)
                rate = dev.rate_down_mbps
            imp = Impairment(delay, 0, loss)
            predicted = tcp_transfer_time_s(PAYLOAD_BYTES, rate * 1e6 * DEFAULT_LINK_EFFICIENCY, imp, imp)
            measured = statistics.mean(down + up)
            rows.append({"delay_ms": delay, "loss_pct": loss, "rate_mbps": rate, "messages": 2 * messages,
                         "predicted_s": predicted, "measured_mean_s": measured,
                         "measured_median_s": statistics.median(down + up),
                         "error": (measured - predicted) / predicted})
    return rows


async def bench_radio(messages: int) -> list[dict]:
    from testbed.emulation import Emulation
    from testbed.model.topology import load_topology
    from testbed.selection import device_costs
    from testbed.selection.costs import DEFAULT_MESSAGE_OVERHEAD_S

    topo = load_topology(REPO / "topologies/paper-radio.yaml")
    plain = topo.model_copy(update={"links": None})
    rows = []
    async with Emulation(topo, "l" + uuid.uuid4().hex[:5], cgroups=False, mobility=False) as emu:
        by_snr = sorted(emu.links, key=lambda lk: lk.snr_up_db)
        server = emu.nodes["server"]
        predicted = {c.id: c for c in device_costs(topo, emu.links)}
        unimpaired = {c.id: c for c in device_costs(plain, emu.links)}
        for where, link in (("edge", by_snr[0]), ("centre", by_snr[-1])):
            dev = emu.nodes[link.id]
            down = await asyncio.to_thread(one_way_times, dev.netns, dev.address, server.netns, messages)
            up = await asyncio.to_thread(one_way_times, server.netns, server.address, dev.netns, messages)
            imp = emu.impairments[link.id]
            c, u = predicted[link.id], unimpaired[link.id]
            rows.append({"where": where, "device": link.id, "snr_up_db": link.snr_up_db, "snr_down_db": link.snr_down_db,
                         "rate_up_mbps": link.rate_up_mbps, "rate_down_mbps": link.rate_down_mbps,
                         "rtt_added_ms": imp.rtt_ms, "loss_up_pct": imp.up.loss_pct, "loss_down_pct": imp.down.loss_pct,
                         "measured_down_s": statistics.mean(down), "measured_up_s": statistics.mean(up),
                         "predicted_down_s": c.t_down_s - DEFAULT_MESSAGE_OVERHEAD_S,
                         "predicted_up_s": c.t_up_s - DEFAULT_MESSAGE_OVERHEAD_S,
                         "unimpaired_down_s": u.t_down_s - DEFAULT_MESSAGE_OVERHEAD_S,
                         "unimpaired_up_s": u.t_up_s - DEFAULT_MESSAGE_OVERHEAD_S})
    return rows


# --- grid: distributions against the relay's transfers on a warm lossy cell --------------
def _nstat(ns: str) -> dict[str, int]:
    r = subprocess.run(_ns(ns, "nstat", "-asz", "--json"), capture_output=True, text=True, timeout=30, check=True)
    kernel = json.loads(r.stdout)["kernel"]
    return {c: int(kernel.get(c, 0)) for c in NSTAT_COUNTERS}


def _windows(ns: str) -> list[dict]:
    """cwnd and ssthresh (segments), the peer's window, the receive space and the smoothed RTT
    of every established connection to or from the broker's port, as `ss -ti` shows them."""
    r = subprocess.run(_ns(ns, "ss", "-tinH", "state", "established"), capture_output=True, text=True, timeout=30)
    out, pairs, head = [], [], None
    for line in r.stdout.splitlines():
        if line[:1].isspace() and head is not None:
            pairs.append((head, line))
            head = None
        else:
            head = line
    for head, info in pairs:
        addrs = head.split()[-2:]
        if not any(a.endswith(":1883") for a in addrs):
            continue
        got = dict(re.findall(r"\b(cwnd|ssthresh|snd_wnd|rcv_space):(\d+)", info))
        rtt = re.search(r"\brtt:([\d.]+)/", info)
        out.append({"local": addrs[0], "peer": addrs[1], "cwnd": int(got.get("cwnd", 0)),
                    "ssthresh": int(got["ssthresh"]) if "ssthresh" in got else None,
                    "snd_wnd_bytes": int(got["snd_wnd"]) if "snd_wnd" in got else None,
                    "rcv_space_bytes": int(got["rcv_space"]) if "rcv_space" in got else None,
                    "srtt_ms": float(rtt.group(1)) if rtt else None})
    return out


def pass_cost_ms(server_ns: str, nodes: list[dict], delays_ms: dict[str, float], count: int = 40) -> float:
    """The delayer's cost per pass, measured now: `ping -U` from the server to every device,
    (RTT - both configured delays) / 2, the median over devices."""
    per_pass = []
    for n in nodes:
        if n["role"] == "device" and delays_ms.get(n["id"], 0) > 0:
            rtt, _ = ping(server_ns, n["address"], count, 0.02)
            per_pass.append((rtt - 2 * delays_ms[n["id"]]) / 2)
    return statistics.median(per_pass) if per_pass else 0.0


class WarmCell:
    """A cell that `testbed up` keeps (`file` as `run_id`), runs on it with `testbed run --run`,
    and its teardown (`close`, also when a run fails)."""

    def __init__(self, file: Path, run_id: str):
        self.file, self.run_id = file, run_id
        self.tb = str(Path(sys.executable).parent / "testbed")
        up = subprocess.run([self.tb, "up", str(file), "--run", run_id, "--json"], capture_output=True, text=True,
                            timeout=600)
        if up.returncode:
            self.close()
            raise RuntimeError(f"testbed up failed ({up.returncode}): {up.stderr[-2000:]}")
        self.status = json.loads(up.stdout)
        self.ns = {n["id"]: n["netns"] for n in self.status["nodes"]}
        self.delays = {d: v["down"]["delay_ms"] for d, v in self.status["impairments"]["devices"].items()}

    def run(self, out: Path, *args: str) -> tuple[dict | None, dict]:
        """(result document or None, {rc, stderr, load_1m}) of one `testbed run --run`."""
        load = os.getloadavg()[0]
        res = subprocess.run([self.tb, "run", str(self.file), "--run", self.run_id, "--out", str(out), "--json", *args],
                             capture_output=True, text=True, timeout=600)
        info = {"rc": res.returncode, "stderr": res.stderr[-2000:], "load_1m": load}
        return (json.loads((out / "result.json").read_text()) if res.returncode == 0 else None), info

    def close(self) -> None:
        subprocess.run([self.tb, "down", "--run", self.run_id], capture_output=True, timeout=300)


def _plan_record(result: dict) -> dict:
    """What the run's plan predicted with (meta.plan), for analysing it again."""
    plan = (result.get("meta") or {}).get("plan") or {}
    return {k: plan.get(k) for k in ("messages_before", "per_pass_s", "p_within", "confidence", "selected",
                                     "predicted_latency_quantiles_s", "point_latency_s")}


def measure_grid(file: Path, runs: int, out_dir: Path, run_id: str) -> dict:
    """Bring `file` up as `run_id`, run it `runs` times on the warm cell, tear it down.
    Every 10 runs, the delayer's per-pass cost is measured with `ping -U` (`pass_ms`)."""
    cell = WarmCell(file, run_id)
    doc: dict = {"topology": str(file), "run_id": run_id, "status": cell.status, "runs": [], "failed": []}
    try:
        ns = cell.ns
        doc["pass_ms"] = []
        for r in range(runs):
            if r % 10 == 0:
                doc["pass_ms"].append(pass_cost_ms(ns["server"], doc["status"]["nodes"], cell.delays))
            before = {k: _nstat(v) for k, v in ns.items()}
            result, info = cell.run(out_dir / f"r{r:03d}")
            after = {k: _nstat(v) for k, v in ns.items()}
            if result is None:
                doc["failed"].append({"run": r, "rc": info["rc"], "stderr": info["stderr"]})
                continue
            doc["runs"].append({
                "run": r, "load_1m": info["load_1m"], "recovered": result.get("recovered"),
                "stages": [{k: s[k] for k in ("device", "attempt", "t_down_s", "t_up_s", "predicted") if k in s}
                           for s in result["stages"]],
                "plan": _plan_record(result), "latency_s": result["latency_s"],
                "nstat": {k: {c: after[k][c] - before[k][c] for c in NSTAT_COUNTERS} for k in ns},
                "windows": {k: _windows(v) for k, v in ns.items()}})
            print(f"grid run {r + 1}/{runs}: latency {result['latency_s']:.2f} s, load {info['load_1m']:.1f}",
                  file=sys.stderr)
    finally:
        cell.close()
    doc["load_1m_end"] = os.getloadavg()[0]
    return doc


def analyse_grid(doc: dict, per_pass_s: float | None, replicates: int = 1000, recorded: bool = True) -> dict:
    """Predictions for every measured transfer, and the checks per grid point and pooled.

    `recorded` (and every run carries its plan's record): each transfer's distribution as
    the run itself predicted it — the plan's `messages_before` (the cell's connection
    ledger), its `per_pass_s` (the delay path's) and the topology's seed — so the checks
    judge what result.json says (the recorded means are checked against it, `record_agrees`).
    Otherwise the bench counts the connections' earlier runs itself, with `per_pass_s`
    (None: the delayer's cost measured with ping during the run, else NFQUEUE_PASS_S)."""
    from collections import Counter, defaultdict

    from testbed.model.impairments import LinkImpairment
    from testbed.model.radio import compute_links
    from testbed.model.topology import load_topology, place
    from testbed.selection import device_costs
    from testbed.selection.checks import Transfer, bias, calibration, pass_rate, passes
    from testbed.selection.costs import DEFAULT_LINK_EFFICIENCY
    from testbed.selection.stochastic import (NFQUEUE_PASS_S, Distribution, stage_distributions,
                                              transfer_distribution)

    recorded = recorded and all((r.get("plan") or {}).get("per_pass_s") is not None for r in doc["runs"])
    if per_pass_s is None:
        measured = [p for p in doc.get("pass_ms", []) if p > 0]
        per_pass_s = statistics.median(measured) / 1e3 if measured else NFQUEUE_PASS_S
    topo = load_topology(doc["topology"])
    radio = topo.links is not None and topo.links.impairments == "radio"
    links = {lk.id: lk for lk in compute_links(topo, place(topo))}
    imps = {d: LinkImpairment.from_json(v) for d, v in doc["status"]["impairments"]["devices"].items()}
    seen: Counter = Counter()
    model, point, fresh = defaultdict(list), defaultdict(list), defaultdict(list)
    counters: dict = defaultdict(lambda: defaultdict(float))  # group -> expected uplink counters
    groups_of: dict[str, str] = {}
    agree = [0, 0]  # recorded means that match the model's, of all
    for run in doc["runs"]:
        devices = [s["device"] for s in run["stages"]]
        chain = [links[d] for d in devices]
        before, pp, seed = dict(seen), per_pass_s, 0
        if recorded:
            before, pp, seed = dict(run["plan"]["messages_before"] or {}), run["plan"]["per_pass_s"], topo.seed
        carried = stage_distributions(topo, chain, impairments=imps, messages_before=before, per_pass_s=pp, seed=seed)
        new = stage_distributions(topo, chain, impairments=imps, per_pass_s=pp, seed=seed)
        points = {c.id: c for c in device_costs(topo, chain, impairments=imps)}
        for s, c, f in zip(run["stages"], carried, new):
            imp = imps[s["device"]]
            g = "paper-radio" if radio else f"{imp.up.delay_ms:g} ms, {imp.up.loss_pct:g} %"
            groups_of[s["device"]] = g
            cl = str(run["run"])
            for key, pred, pred_fresh in (("t_down_s", c.t_down, f.t_down), ("t_up_s", c.t_up, f.t_up)):
                model[g].append(Transfer(s[key], pred, cl, g))
                fresh[g].append(Transfer(s[key], pred_fresh, cl, g))
                point[g].append(Transfer(s[key], Distribution.point(getattr(points[s["device"]], key)), cl, g))
                agree[0] += abs(s["predicted"][key] - pred.mean()) <= 1e-9 * max(1.0, pred.mean())
                agree[1] += 1
            link = links[s["device"]]
            up = transfer_distribution(PAYLOAD_BYTES, link.rate_up_mbps * 1e6 * DEFAULT_LINK_EFFICIENCY, imp.up,
                                       imp.down, messages_before=before.get(s["device"], 0), per_pass_s=pp)
            for k, v in up.counters.items():
                counters[g][k] += v
        seen.update(devices)
    rows = []
    for g in [*sorted(model), "pooled"]:
        pick = (lambda d: [t for ts in d.values() for t in ts]) if g == "pooled" else (lambda d, g=g: d[g])
        b, c = bias(pick(model)), calibration(pick(model))
        row = {"group": g, "bias": b, "calibration": c, "passes": passes(b, c),
               "point_bias": bias(pick(point)), "fresh_bias": bias(pick(fresh)),
               "pass_rate_if_correct": pass_rate(pick(model), replicates=replicates)}
        devs = [d for d, gg in groups_of.items() if gg == g or g == "pooled"]
        measured = {k: sum(run["nstat"][d][k] for run in doc["runs"] for d in devs) for k in NSTAT_COUNTERS}
        expected = defaultdict(float)
        for gg, cs in counters.items():
            if gg == g or g == "pooled":
                for k, v in cs.items():
                    expected[k] += v
        row["uplink_counters"] = {"measured": measured, "model_latents": dict(expected),
                                  "messages": sum(1 for t in pick(model) if True) // 2}
        rows.append(row)
    server = {k: sum(run["nstat"]["server"][k] for run in doc["runs"]) for k in NSTAT_COUNTERS}
    return {"per_pass_s": per_pass_s, "pass_ms_measured": doc.get("pass_ms", []), "runs": len(doc["runs"]),
            "failed": len(doc.get("failed", [])), "recorded": recorded, "record_agrees": agree,
            "load_1m": [r["load_1m"] for r in doc["runs"]], "rows": rows, "downlink_counters_server": server}


def print_grid(an: dict) -> None:
    loads = an["load_1m"]
    passes = ", ".join(f"{p:.2f}" for p in an["pass_ms_measured"]) or "not measured"
    how = (f"as each run recorded them (the plan's connection counts and delay path; {an['record_agrees'][0]} of "
           f"{an['record_agrees'][1]} recorded means reproduced)" if an.get("recorded") else
           f"recounted by the bench, delayer per-pass cost {an['per_pass_s'] * 1e3:.2f} ms")
    print(f"grid: {an['runs']} warm-cell runs ({an['failed']} failed), load average {min(loads):.1f}-{max(loads):.1f}; "
          f"predictions {how} (ping -U during the run: {passes} ms per pass); "
          "transfers measured on this machine, predictions modelled")
    head = (f"{'grid point':<14} {'n':>4} {'meas s':>7} {'model s':>7} {'bias [95 %]':>22} {'in p10-p90':>10} "
            f"{'< p50':>6} {'point-model bias':>16} {'fresh-conn bias':>15} {'P(pass | correct)':>17}")
    print(head)
    print("-" * len(head))
    for r in an["rows"]:
        b, c, pr = r["bias"], r["calibration"], r["pass_rate_if_correct"]
        ok = "ok" if r["passes"]["all"] else "FAIL " + ",".join(k for k, v in r["passes"].items() if not v and k != "all")
        print(f"{r['group']:<14} {b['n']:>4} {b['measured_mean_s']:>7.3f} {b['predicted_mean_s']:>7.3f} "
              f"{100 * b['bias']:>+6.1f} % [{100 * b['low']:+5.1f}, {100 * b['high']:+5.1f}] {100 * c['inside_p10_p90']:>9.1f}% "
              f"{100 * c['below_p50']:>5.1f}% {100 * r['point_bias']['bias']:>+15.1f}% {100 * r['fresh_bias']['bias']:>+14.1f}% "
              f"{100 * pr['all']:>16.0f}%  {ok}")
    print("kernel counters (nstat) per uplink message, measured (every packet of the device's socket: latents,"
          " status and acks) vs modelled (latents only):")
    for r in an["rows"]:
        u, n = r["uplink_counters"], max(1, r["uplink_counters"]["messages"])
        print(f"  {r['group']:<14} retransmitted segments {u['measured']['TcpRetransSegs'] / n:.2f} vs "
              f"{u['model_latents'].get('retrans_segs', 0) / n:.2f}, loss probes {u['measured']['TcpExtTCPLossProbes'] / n:.3f} vs "
              f"{u['model_latents'].get('loss_probes', 0) / n:.3f}, timeouts {u['measured']['TcpExtTCPTimeouts'] / n:.3f} vs "
              f"{u['model_latents'].get('timeouts', 0) / n:.3f}, SACK recoveries {u['measured']['TcpExtTCPSackRecovery'] / n:.2f} vs "
              f"{u['model_latents'].get('recoveries', 0) / n:.2f}")
    s = an["downlink_counters_server"]
    print(f"  server (every downlink): {s['TcpRetransSegs']} retransmitted segments, {s['TcpExtTCPLossProbes']} loss probes, "
          f"{s['TcpExtTCPTimeouts']} timeouts, {s['TcpExtTCPSackRecovery']} SACK recoveries")


# --- confidence: chance-constrained plans against the mean-based one on a warm lossy cell ---
def pick_t_max(file: Path, confidence: float, before: int, per_pass_s: float) -> float:
    """A T_max where the mean-based plan is tight by its own (point) model: the smallest on a
    0.5 s grid where it takes >= 3 stages that fill >= 90 % of T_max, and a plan keeping
    `confidence` exists (modelled with every connection `before` runs warm)."""
    from testbed.errors import InfeasibleError
    from testbed.methods.base import PlanContext
    from testbed.methods.multistage.strategy import Multistage
    from testbed.model.radio import compute_links
    from testbed.model.topology import load_topology, place

    topo = load_topology(file)
    links = compute_links(topo, place(topo))
    ctx = dict(messages_before={lk.id: before for lk in links}, delay_path="nfqueue+iptables" if per_pass_s else "none")
    for t_max in [x / 2 for x in range(2, 61)]:
        try:
            mean = Multistage("dp").plan(PlanContext(topo, links, t_max, topo.budgets.e_max_j, topo.seed, **ctx))
            Multistage("dp").plan(PlanContext(topo, links, t_max, topo.budgets.e_max_j, topo.seed,
                                              confidence=confidence, **ctx))
        except InfeasibleError:
            continue
        if len(mean.selected) >= 3 and mean.selection.latency_s >= 0.9 * t_max:
            return t_max
    raise RuntimeError(f"no T_max up to 30 s makes {file}'s mean-based plan tight; give --confidence-tmax")


def measure_confidence(file: Path, runs: int, out_dir: Path, run_id: str, confidence: float, warmup: int,
                       t_max: float | None) -> dict:
    """Bring `file` up, warm every connection with `warmup` loose runs (every device, the
    topology's budgets), then alternate the mean-based plan and `--confidence` at T_max,
    `runs` each; tear down."""
    from testbed.selection.stochastic import MAX_MESSAGES_BEFORE, NFQUEUE_PASS_S

    cell = WarmCell(file, run_id)
    doc: dict = {"topology": str(file), "run_id": run_id, "confidence": confidence, "warmup": warmup, "runs": [],
                 "load_1m_start": os.getloadavg()[0]}
    try:
        for w in range(warmup):
            result, info = cell.run(out_dir / f"w{w:02d}")
            print(f"warm-up {w + 1}/{warmup}: {'ok' if result else 'failed'}, load {info['load_1m']:.1f}",
                  file=sys.stderr)
        path = cell.status["impairments"].get("path")
        doc["t_max_s"] = t_max or pick_t_max(file, confidence, min(warmup, MAX_MESSAGES_BEFORE),
                                             NFQUEUE_PASS_S if path == "nfqueue+iptables" else 0.0)
        for i in range(runs):
            for mode in ("mean", "chance"):
                args = ["--tmax", f"{doc['t_max_s']:g}", *(["--confidence", f"{confidence:g}"] if mode == "chance"
                                                           else [])]
                result, info = cell.run(out_dir / f"{mode}{i:03d}", *args)
                rec = {"mode": mode, "i": i, "rc": info["rc"], "load_1m": info["load_1m"]}
                if result is None:
                    rec["error"] = info["stderr"][-400:]
                else:
                    rec |= {"latency_s": result["latency_s"], "t_max_s": result["t_max_s"],
                            "predicted_latency_s": result["predicted_latency_s"],
                            "quantiles": result.get("predicted_latency_quantiles_s"), "plan": _plan_record(result),
                            "overrun_s": sum(s.get("overrun_s") or 0.0 for s in result["stages"]),
                            "recovered": len(result.get("recovered") or [])}
                doc["runs"].append(rec)
                print(f"{mode} {i + 1}/{runs}: " + (f"latency {rec['latency_s']:.2f} s of {doc['t_max_s']:g}, "
                                                      f"P modelled {rec['plan']['p_within']:.2f}"
                                                      if result else f"failed (rc {info['rc']})")
                      + f", load {info['load_1m']:.1f}", file=sys.stderr)
    finally:
        cell.close()
    doc["load_1m_end"] = os.getloadavg()[0]
    return doc


def confidence_pass_rate(p_within: list[float], share: float = 0.8, replicates: int = 20000, seed: int = 0) -> float:
    """How often a right implementation passes ">= share of the runs within T_max": each
    run kept T_max with its plan's modelled probability, independently (Monte-Carlo)."""
    import numpy as np

    p = np.asarray(p_within, float)
    hits = np.random.default_rng(seed).random((replicates, p.size)) < p
    return float(np.mean(hits.sum(axis=1) >= np.ceil(share * p.size - 1e-9)))


def analyse_confidence(doc: dict) -> dict:
    from testbed.selection.checks import wilson

    rows = {}
    for mode in ("mean", "chance"):
        rs = [r for r in doc["runs"] if r["mode"] == mode]
        ok = [r for r in rs if "latency_s" in r]
        within = sum(1 for r in ok if r["latency_s"] <= r["t_max_s"])
        host = sum(1 for r in ok if r["latency_s"] - r["overrun_s"] <= r["t_max_s"])
        ps = [r["plan"]["p_within"] for r in ok]
        mean = (lambda xs: statistics.fmean(xs) if xs else float("nan"))
        rows[mode] = {"runs": len(rs), "failed": len(rs) - len(ok), "within": within,
                      "share": within / max(1, len(rs)), "interval": wilson(within, len(rs)),
                      "within_without_overrun": host, "p_within_mean": mean(ps),
                      "latency_mean_s": mean([r["latency_s"] for r in ok]),
                      "predicted_mean_s": mean([r["predicted_latency_s"] for r in ok]),
                      "stages": sorted({len(r["plan"]["selected"]) for r in ok}),
                      "pass_rate_if_right": confidence_pass_rate(ps) if ps else float("nan")}
    loads = [r["load_1m"] for r in doc["runs"]]
    return {"t_max_s": doc["t_max_s"], "confidence": doc["confidence"], "rows": rows,
            "load": (min(loads), max(loads)) if loads else None}


def print_confidence(an: dict) -> None:
    lo, hi = an["load"] or (float("nan"), float("nan"))
    print(f"confidence: T_max {an['t_max_s']:g} s (the mean-based plan tight by its point model), P = "
          f"{an['confidence']:g}, warm cell, load average {lo:.1f}-{hi:.1f}; latency measured, P(within) modelled")
    head = (f"{'plan':<12} {'runs':>4} {'failed':>6} {'within T_max':>12} {'share [95 %]':>20} {'w/o overrun':>11} "
            f"{'P modelled':>10} {'meas s':>7} {'pred s':>7} {'stages':>7} {'P(pass | right)':>15}")
    print(head)
    print("-" * len(head))
    for mode, label in (("chance", f"P >= {an['confidence']:g}"), ("mean", "mean-based")):
        r = an["rows"][mode]
        lo_i, hi_i = r["interval"]
        print(f"{label:<12} {r['runs']:>4} {r['failed']:>6} {r['within']:>12} {r['share']:>7.2f} "
              f"[{lo_i:.2f}, {hi_i:.2f}] {r['within_without_overrun']:>11} {r['p_within_mean']:>10.3f} "
              f"{r['latency_mean_s']:>7.2f} {r['predicted_mean_s']:>7.2f} {','.join(map(str, r['stages'])):>7} "
              f"{100 * r['pass_rate_if_right']:>14.1f}%")
    print("  (w/o overrun: runs within T_max once the host's compute beyond the profiles' times is taken off; "
          "P(pass | right): Monte-Carlo, each run within T_max with its plan's modelled probability, "
          "pass = >= 80 % of the runs)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sink")
    ap.add_argument("--source")
    ap.add_argument("--count", type=int, default=5)
    ap.add_argument("--gap", type=float, default=0.1)
    ap.add_argument("--messages", type=int, default=8, help="256 KB messages per direction and grid point")
    ap.add_argument("--pings", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=8.0, help="iperf3 seconds per rate")
    ap.add_argument("--only", default="ping,cost,predict,radio")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--runs", type=int, default=30, help="grid: warm-cell runs (12 lossy transfers each)")
    ap.add_argument("--grid-topology", type=Path, default=GRID_TOPOLOGY)
    ap.add_argument("--save", type=Path, help="grid: write the raw measurements here")
    ap.add_argument("--from", dest="from_file", type=Path, help="analyse saved grid measurements (no root needed)")
    ap.add_argument("--confidence-topology", type=Path, default=CONFIDENCE_TOPOLOGY)
    ap.add_argument("--confidence-runs", type=int, default=40, help="confidence: runs of each plan")
    ap.add_argument("--confidence-p", type=float, default=0.9)
    ap.add_argument("--confidence-tmax", type=float, default=None, help="confidence: T_max (default: picked)")
    ap.add_argument("--warmup", type=int, default=8, help="confidence: loose runs that warm every connection first")
    ap.add_argument("--per-pass-ms", type=float, default=None,
                    help="grid: the delayer's per-pass cost in the model (default: measured with ping -U during the "
                         "run, else stochastic.NFQUEUE_PASS_S)")
    args = ap.parse_args()
    if args.from_file:
        saved = json.loads(args.from_file.read_text())
        if "confidence" in saved:
            an = analyse_confidence(saved)
            print(json.dumps(an, indent=2)) if args.json else print_confidence(an)
            return 0
        per_pass = None if args.per_pass_ms is None else args.per_pass_ms / 1e3
        an = analyse_grid(saved, per_pass, recorded=args.per_pass_ms is None)
        print(json.dumps(an, indent=2)) if args.json else print_grid(an)
        return 0
    if args.sink:
        sink(args.sink, args.count)
        return 0
    if args.source:
        source(args.source, args.count, args.gap)
        return 0
    if os.geteuid() != 0:
        print("bench/links.py needs root", file=sys.stderr)
        return 4
    parts = set(args.only.split(","))
    t0 = time.perf_counter()
    doc: dict = {"load_avg_1m": os.getloadavg()[0]}
    if "ping" in parts:
        doc["ping"] = asyncio.run(bench_ping(args.pings))
    if "cost" in parts:
        doc["cost"] = asyncio.run(bench_cost(args.seconds))
    if "predict" in parts:
        doc["predict"] = asyncio.run(bench_predict(args.messages))
    if "radio" in parts:
        doc["radio"] = asyncio.run(bench_radio(args.messages))
    if "grid" in parts:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="bench-grid-") as tmp:
            raw = measure_grid(args.grid_topology, args.runs, Path(tmp), "g" + uuid.uuid4().hex[:5])
        if args.save:
            args.save.write_text(json.dumps(raw, indent=1))
        per_pass = None if args.per_pass_ms is None else args.per_pass_ms / 1e3
        doc["grid"] = analyse_grid(raw, per_pass, recorded=args.per_pass_ms is None)
    if "confidence" in parts:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="bench-conf-") as tmp:
            raw = measure_confidence(args.confidence_topology, args.confidence_runs, Path(tmp),
                                     "c" + uuid.uuid4().hex[:5], args.confidence_p, args.warmup, args.confidence_tmax)
        if args.save:
            args.save.with_suffix(".confidence.json").write_text(json.dumps(raw, indent=1))
        doc["confidence"] = analyse_confidence(raw)
    doc["wall_s"] = time.perf_counter() - t0
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"load average at start {doc['load_avg_1m']:.1f}; all numbers measured on this machine")
    for r in doc.get("ping", []):
        print(f"ping -U  delay {r['delay_ms']:>4g} ms loss {r['loss_pct']:>3g} %: RTT {r['rtt_measured_ms']:7.2f} ms "
              f"(configured {r['rtt_configured_ms']:g}, ratio {r['rtt_measured_ms'] / r['rtt_configured_ms']:.3f}); "
              f"loss {r['loss_measured']:.4f} of {r['packets']} (configured {r['loss_configured']:.4f})")
    for r in doc.get("cost", []):
        print(f"delayer  {r['rate_mbps']:>4g} Mbit/s link, 20 ms: goodput {r['goodput_mbps']:6.1f} Mbit/s, "
              f"{r['packets_per_s']:7.0f} packets/s, CPU {100 * r['cpu_share']:5.1f} % of a core, "
              f"late {r['late_us_mean']:.0f} us mean ({r['scheduling']})")
    if doc.get("predict"):
        print(f"{'delay ms':>8} {'loss %':>6} | {'predicted s':>11} {'measured s':>10} {'median s':>9} {'error':>7}")
        for r in doc["predict"]:
            print(f"{r['delay_ms']:8g} {r['loss_pct']:6g} | {r['predicted_s']:11.3f} {r['measured_mean_s']:10.3f} "
                  f"{r['measured_median_s']:9.3f} {100 * r['error']:+6.1f}%")
        pooled_p = sum(r["predicted_s"] for r in doc["predict"])
        pooled_m = sum(r["measured_mean_s"] for r in doc["predict"])
        print(f"pooled: |sum measured - sum predicted| / sum predicted = {abs(pooled_m - pooled_p) / pooled_p:.3f}")
    for r in doc.get("radio", []):
        print(f"paper-radio {r['where']:6} {r['device']}: SNR up/down {r['snr_up_db']:.1f}/{r['snr_down_db']:.1f} dB, "
              f"{r['rate_up_mbps']:.1f}/{r['rate_down_mbps']:.1f} Mbit/s, +{r['rtt_added_ms']:.1f} ms RTT, loss "
              f"{r['loss_up_pct']:.3f}/{r['loss_down_pct']:.3f} %: 256 KB down {r['measured_down_s']:.3f} s "
              f"(predicted {r['predicted_down_s']:.3f}, without impairments {r['unimpaired_down_s']:.3f}), "
              f"up {r['measured_up_s']:.3f} s (predicted {r['predicted_up_s']:.3f}, without {r['unimpaired_up_s']:.3f})")
    if doc.get("grid"):
        print_grid(doc["grid"])
    if doc.get("confidence"):
        print_confidence(doc["confidence"])
    print(f"({doc['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
