"""Shaping accuracy: goodput / configured rate (bulk TCP, iperf3) and 256 KB message
transfer time / ideal time, at 1, 5, 20 and 100 Mbit/s, uplink and downlink, through the
netns backend's server-side HTB (+ IFB for the uplink) between a device namespace and
the edge server namespace.

Targets (issue 4): goodput ratio within 0.90-1.00; 256 KB time <= 1.10 x ideal + 5 ms,
where ideal = payload bits / rate (frame and TCP/IP headers are ~4.6 % of a full frame,
so ~0.956 goodput and ~1.046 x time are what a perfect shaper gives). Needs root; bounded
(about a minute); leaves nothing behind.

    sudo .venv/bin/python bench/shaping.py [--rates 1 5 20 100] [--gso-on]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
import uuid

PAYLOAD_BYTES = 262144
MSG_PORT = 5511
IPERF_PORT = 5512
SERVER = "198.18.0.1"


# --- message peers (run inside the namespaces) -------------------------------------------
def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(1 << 20, n - len(buf)))
        if not chunk:
            raise ConnectionError("peer closed")
        buf += chunk
    return bytes(buf)


def peer_server(count: int) -> None:
    ls = socket.create_server((SERVER, MSG_PORT))
    ls.settimeout(60)
    conn, _ = ls.accept()
    conn.settimeout(60)
    for _ in range(count):
        op, n = struct.unpack("!cQ", _recv_exact(conn, 9))
        if op == b"U":
            _recv_exact(conn, n)
            conn.sendall(b"k")
        else:
            conn.sendall(b"\0" * n)
    conn.close()


def peer_client(direction: str, count: int, gap_s: float) -> None:
    s = socket.create_connection((SERVER, MSG_PORT), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = b"\0" * PAYLOAD_BYTES
    times = []
    for _ in range(count):
        time.sleep(gap_s)  # idle between messages, like relay stages
        t0 = time.perf_counter()
        if direction == "up":
            s.sendall(struct.pack("!cQ", b"U", PAYLOAD_BYTES) + payload)
            _recv_exact(s, 1)
        else:
            s.sendall(struct.pack("!cQ", b"D", PAYLOAD_BYTES))
            _recv_exact(s, PAYLOAD_BYTES)
        times.append(time.perf_counter() - t0)
    s.close()
    print(json.dumps(times))


# --- driver ------------------------------------------------------------------------------
def _nsenter(ns: str, *argv: str) -> list[str]:
    return ["nsenter", f"--net={ns}", *argv]


def _wait_listen(ns: str, port: int) -> None:
    for _ in range(100):
        r = subprocess.run(_nsenter(ns, "ss", "-ltnH", f"sport = :{port}"), capture_output=True, text=True)
        if r.stdout.strip():
            return
        time.sleep(0.03)
    raise RuntimeError(f"nothing listens on :{port}")


def iperf_mbps(server_ns: str, dev_ns: str, seconds: float, reverse: bool) -> float:
    srv = subprocess.Popen(_nsenter(server_ns, "iperf3", "-s", "-1", "-B", SERVER, "-p", str(IPERF_PORT)),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listen(server_ns, IPERF_PORT)
        r = subprocess.run(_nsenter(dev_ns, "iperf3", "-c", SERVER, "-p", str(IPERF_PORT), "-t", str(seconds),
                                    "-O", "1", "-J", *(["-R"] if reverse else [])),
                           capture_output=True, text=True, timeout=seconds + 30)
        return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
    finally:
        srv.kill()
        srv.wait()


def message_times(server_ns: str, dev_ns: str, direction: str, count: int) -> list[float]:
    me = os.path.abspath(__file__)
    srv = subprocess.Popen(_nsenter(server_ns, sys.executable, me, "--peer", "server", "--count", str(count)))
    try:
        _wait_listen(server_ns, MSG_PORT)
        r = subprocess.run(_nsenter(dev_ns, sys.executable, me, "--peer", "client", "--direction", direction,
                                    "--count", str(count)), capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-400:])
        return json.loads(r.stdout)
    finally:
        srv.wait(timeout=30)


async def run(rates: list[float], gso_off: bool) -> list[dict]:
    from testbed.emulation import Emulation
    from testbed.model.topology import parse_topology

    topo = parse_topology("name: bench-shaping\ndevices:\n  list:\n    - {id: dev01, position: {x_m: 300, y_m: 250}}\n")
    run_id = "s" + uuid.uuid4().hex[:5]
    rows = []
    async with Emulation(topo, run_id, gso_off=gso_off, cgroups=False) as emu:
        server, dev = emu.nodes["server"].netns, emu.nodes["dev01"].netns
        for rate in rates:
            await emu.set_link("dev01", rate, rate)
            assert await emu.verify_shaping() == []
            secs = 4 if rate < 5 else 3
            count = 3 if rate < 5 else 6
            ideal = PAYLOAD_BYTES * 8 / (rate * 1e6)
            row = {"rate_mbps": rate, "ideal_256k_s": ideal}
            for direction in ("up", "down"):
                gp = await asyncio.to_thread(iperf_mbps, server, dev, secs, direction == "down")
                t = await asyncio.to_thread(message_times, server, dev, direction, count)
                row[f"{direction}_goodput_ratio"] = gp / rate
                row[f"{direction}_256k_median_s"] = statistics.median(t)
                row[f"{direction}_256k_max_s"] = max(t)
                row[f"{direction}_256k_ratio"] = statistics.median(t) / ideal
                row[f"{direction}_256k_ok"] = max(t) <= 1.10 * ideal + 0.005
            rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer", choices=["server", "client"])
    ap.add_argument("--direction", default="up")
    ap.add_argument("--count", type=int, default=5)
    ap.add_argument("--rates", type=float, nargs="+", default=[1, 5, 20, 100])
    ap.add_argument("--gso-on", action="store_true", help="leave GSO on (default: gso_max_segs=1 on the links)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.peer == "server":
        peer_server(args.count)
        return 0
    if args.peer == "client":
        peer_client(args.direction, args.count, gap_s=0.2)
        return 0
    if os.geteuid() != 0:
        print("bench/shaping.py needs root", file=sys.stderr)
        return 4
    t0 = time.perf_counter()
    rows = asyncio.run(run(args.rates, gso_off=not args.gso_on))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"GSO {'on' if args.gso_on else 'off (gso_max_segs=1)'}; goodput = iperf3 receiver / configured; "
          "256 KB = median time / ideal (max within 1.10 x ideal + 5 ms?)")
    print(f"{'Mbit/s':>6} | {'up goodput':>10} {'down goodput':>12} | {'ideal 256K s':>12} "
          f"{'up 256K':>8} {'max':>6} {'ok':>3} {'down 256K':>9} {'max':>6} {'ok':>3}")
    for r in rows:
        i = r["ideal_256k_s"]
        print(f"{r['rate_mbps']:6g} | {r['up_goodput_ratio']:10.3f} {r['down_goodput_ratio']:12.3f} | "
              f"{i:12.4f} {r['up_256k_ratio']:8.3f} {r['up_256k_max_s'] / i:6.3f} {'yes' if r['up_256k_ok'] else 'NO':>3} "
              f"{r['down_256k_ratio']:9.3f} {r['down_256k_max_s'] / i:6.3f} {'yes' if r['down_256k_ok'] else 'NO':>3}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
