"""`up`/`down` wall time of 20 devices: docker backend next to the netns backend, one run.

Both build the same cell (namespaces or containers, the cell's HTB/IFB shaping read back
and compared with the plan, CPU/memory limits; no broker, no agents), alternating
backends `--repeat` times; prints medians, the ratio docker / netns, and the memory of one
idle device container: its cgroup's charge plus the RSS of its containerd shim on the host.
Target (issue 9): 20 containers up in < 15 s. Needs root and a docker daemon; leaves
nothing behind but the node image.

    sudo .venv/bin/python bench/docker_startup.py [--devices 20] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

from testbed.emulation import Emulation
from testbed.emulation.docker.image import build_image, docker_client
from testbed.emulation.runs import cleanup_run
from testbed.model.topology import parse_topology

TARGET_UP_S = 15.0


def topo_text(n: int) -> str:
    return f"name: bench-{n}\nseed: 1\ndevices: {{count: {n}}}\ncell: {{shared_capacity: true}}\n"


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _shim_rss_kb(container_id: str) -> int:
    """RSS of the containerd shim that runs this container (one per container)."""
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"containerd-shim-runc-v2") and container_id.encode() in b" ".join(cmd):
            return _rss_kb(int(p))
    return 0


def _memory(emu: Emulation) -> dict[str, float]:
    """Per device container: cgroup memory charge and shim RSS, in MB (medians)."""
    be = emu.backend
    charged, shims = [], []
    for dev in emu.device_ids():
        cg = be.cgroup_dir(dev, "memory")
        charged.append(int((cg / "memory.usage_in_bytes").read_text()) / 2**20)
        shims.append(_shim_rss_kb(cg.name) / 1024)
    return {"container_cgroup_mb": statistics.median(charged), "shim_rss_mb": statistics.median(shims)}


async def once(n: int, backend: str) -> dict[str, float]:
    run = "b" + uuid.uuid4().hex[:5]
    emu = Emulation(parse_topology(topo_text(n)), run, backend=backend, mobility=False)
    try:
        t0 = time.perf_counter()
        await emu.__aenter__()
        up = time.perf_counter() - t0
        assert await emu.verify_shaping() == [], f"{backend}: shaping differs from the plan"
        mem = _memory(emu) if backend == "docker" else {}
        t0 = time.perf_counter()
        await emu.__aexit__(None, None, None)
        down = time.perf_counter() - t0
    finally:
        cleanup_run(run)
    return {"up_s": up, "down_s": down, **mem}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/docker_startup.py needs root", file=sys.stderr)
        return 4
    build_image(docker_client())  # made once and kept: not part of `up`
    res: dict[str, list[dict[str, float]]] = {"netns": [], "docker": []}
    for _ in range(args.repeat):
        for backend in ("netns", "docker"):
            res[backend].append(asyncio.run(once(args.devices, backend)))
    med = {b: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for b, rows in res.items()}
    doc = {
        "devices": args.devices,
        "repeat": args.repeat,
        "netns": med["netns"],
        "docker": med["docker"],
        "up_ratio_docker_netns": med["docker"]["up_s"] / med["netns"]["up_s"],
        "down_ratio_docker_netns": med["docker"]["down_s"] / med["netns"]["down_s"],
        "target_up_s": TARGET_UP_S,
        "docker_up_vs_target": med["docker"]["up_s"] / TARGET_UP_S,
        "docker_up_runs_s": [round(r["up_s"], 3) for r in res["docker"]],
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    n, d, m = args.devices, med["docker"], med["netns"]
    print(f"{n} devices, median of {args.repeat} (alternating backends)")
    print(f"{'':8} {'up s':>8} {'down s':>8}")
    print(f"{'netns':8} {m['up_s']:8.3f} {m['down_s']:8.3f}")
    print(f"{'docker':8} {d['up_s']:8.3f} {d['down_s']:8.3f}")
    print(f"ratio docker/netns: up {doc['up_ratio_docker_netns']:.2f}, down {doc['down_ratio_docker_netns']:.2f}")
    print(f"docker up vs the {TARGET_UP_S:g} s target: {doc['docker_up_vs_target']:.2f} (runs: {doc['docker_up_runs_s']})")
    print(f"memory per idle device container: {d['container_cgroup_mb']:.1f} MB charged to its cgroup "
          f"+ {d['shim_rss_mb']:.1f} MB containerd shim RSS on the host")
    return 0


if __name__ == "__main__":
    sys.exit(main())
