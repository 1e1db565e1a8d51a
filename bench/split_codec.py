"""Per-message handling cost of split diffusion's messages, by size: the calibration of
`methods/split/plan.py`'s handling term (kept apart from the sweeps it is judged on:
loopback, and topologies/small.yaml — never paper.yaml).

For the latent (256 KB) and SD1.5's cut tensors at 256 px (7.0 MB fp16, 13.9 MB fp32
heads), with the tiny model's real features as the body and the rest zero padding:

1. wire encode and decode (relay/wire.py: one zero-filled buffer, read-only views), side
   by side with a copying decoder (a bytes slice + `safetensors.numpy.load`, the decoder
   before issue 15) — the ratio is what decoding without copies saves;
2. one message relayed through mosquitto on loopback (publish -> broker -> subscriber,
   paho/aiomqtt, no shaping): the clients' and the broker's handling, without a link;
3. a least-squares line through the origin of (size, encode + decode + loopback relay)
   per message — the handling's floor, on an idle loopback with unconstrained processes;
4. with --emulated (root): split generations on topologies/small.yaml's shaped cell; for
   every feature hop, what it took beyond the cost model's link time (the hop's predicted
   t_feat_up / t_feat_down), per MB and per unit of handling_s's quota factor
   (1/2 + 1/(2 min(1, q))). Their median is what HANDLING_S_PER_MB is set to: it holds
   the encoding, the clients, the broker and the transport of a multi-MB message over
   the emulated link as this machine runs them — printed next to the constant.

    .venv/bin/python bench/split_codec.py [--reps 7] [--emulated] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from testbed.diffusion.split import sd15_split_bytes_per_step  # noqa: E402
from testbed.relay.wire import Message, decode, encode  # noqa: E402
from testbed.methods.split.plan import HANDLING_S_PER_MB, handling_s  # noqa: E402

SIZES = {"latent 256 KB": 262144, "features fp16 head": sd15_split_bytes_per_step(256, 2, 2),
         "features fp32 head": sd15_split_bytes_per_step(256, 4, 2)}


def tiny_features() -> dict[str, np.ndarray]:
    """The tiny model's head output for one step (the real body of a feature message)."""
    import torch

    from testbed.diffusion import load_model
    from testbed.diffusion.models import encode_prompt, initial_latent
    from testbed.diffusion.split import SplitRunner

    model = load_model("tiny", precision="fp32", device="cpu")
    with torch.inference_mode():
        feats = SplitRunner(model.unet).head(initial_latent(model, 1), torch.tensor(999),
                                             encode_prompt(model, "a handwritten 7"))
    return {k: v.float().numpy() for k, v in feats.items()}


def copying_decode(data: bytes, start: int, body_bytes: int) -> dict[str, np.ndarray]:
    """The decoder's body path before issue 15: slice copies, the library's copying load."""
    from safetensors.numpy import load

    pad = data[start + body_bytes:]
    assert pad.count(0) == len(pad)
    return load(bytes(data[start:start + body_bytes]))


def best_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def codec_rows(reps: int) -> list[dict]:
    feats = tiny_features()
    rows = []
    for name, size in SIZES.items():
        msg = Message(kind="result", run="bench", device="dev01", stage=0, attempt=1, steps=(0, 1), total_steps=10,
                      tensors=feats, meta={"role": "head"})
        data = encode(msg, pad_to_bytes=size)
        start = len(data) - msg.body_bytes - msg.pad_bytes
        frozen = bytes(data)  # what paho hands the receiver
        rows.append({
            "message": name, "bytes": len(data),
            "encode_ms": best_ms(lambda: encode(msg, pad_to_bytes=size), reps),
            "decode_ms": best_ms(lambda: decode(frozen, max_bytes=size + 2**22, run="bench"), reps),
            "copying_decode_ms": best_ms(lambda: copying_decode(frozen, start, msg.body_bytes), reps),
        })
    return rows


async def _relay_times(port: int, reps: int) -> dict[int, float]:
    import aiomqtt

    out = {}
    async with aiomqtt.Client("127.0.0.1", port) as sub, aiomqtt.Client("127.0.0.1", port) as pub:
        await sub.subscribe("bench/x", qos=1)
        for size in SIZES.values():
            payload = bytes(size)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                await pub.publish("bench/x", payload, qos=1)
                async for _msg in sub.messages:
                    times.append(time.perf_counter() - t0)
                    break
            out[size] = 1e3 * statistics.median(times)
    return out


def relay_ms(reps: int) -> dict[int, float]:
    """Median loopback relay time per size through a private mosquitto on 127.0.0.1."""
    if shutil.which("mosquitto") is None:
        sys.exit("needs mosquitto (apt install mosquitto)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        conf = Path(d) / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmessage_size_limit 0\n")
        proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
                if time.monotonic() > deadline or proc.poll() is not None:
                    sys.exit("mosquitto did not start on loopback")
                time.sleep(0.05)
            return asyncio.run(_relay_times(port, reps))
        finally:
            proc.terminate()
            proc.wait(timeout=10)


async def _emulated_hops(generations: int) -> list[dict]:
    """Feature hops of split runs on small.yaml: measured time beyond the link model."""
    from testbed.composition.session import RunSession
    from testbed.model.profiles import load_profiles
    from testbed.model.topology import load_topology, place

    topo = load_topology(REPO / "topologies" / "small.yaml")
    profiles = load_profiles()
    cores = {d.id: profiles[d.profile].cpu_cores for d in place(topo).devices}
    hops = []
    with tempfile.TemporaryDirectory() as out:
        async with RunSession(topo, out_dir=Path(out)) as r:
            for _ in range(generations):
                res = (await r.run("split", t_max_s=4.0, e_max_j=1000.0)).to_json()
                step = res["meta"]["plan"]["step"]
                mb = step["feature_bytes"] / 1e6
                for stage in res["stages"]:
                    for role, measured, predicted in (("head", stage["head"]["t_up_s"], step["t_feat_up_s"]),
                                                      ("tail", stage["tail"]["t_down_s"], step["t_feat_down_s"])):
                        dev = stage[role]["device"]
                        factor = 0.5 + 0.5 / min(1.0, cores[dev])
                        hops.append({"role": role, "device": dev, "mb": mb, "measured_s": measured,
                                     "link_s": predicted, "excess_s": measured - predicted,
                                     "s_per_mb": (measured - predicted) / mb / factor})
    return hops


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--emulated", action="store_true", help="also calibrate on small.yaml's shaped cell (root)")
    p.add_argument("--generations", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    hops = asyncio.run(_emulated_hops(args.generations)) if args.emulated else []
    rows = codec_rows(args.reps)
    relay = relay_ms(args.reps)
    for r in rows:
        r["relay_ms"] = relay[r["bytes"]]
        r["handling_ms"] = r["encode_ms"] + r["decode_ms"] + r["relay_ms"]
        r["plan_ms"] = 1e3 * handling_s(r["bytes"])
    mb = np.array([r["bytes"] / 1e6 for r in rows])
    fit = {"loopback_s_per_mb": float(mb @ np.array([r["handling_ms"] / 1e3 for r in rows]) / (mb @ mb))}
    if hops:
        fit["emulated_s_per_mb"] = float(np.median([h["s_per_mb"] for h in hops]))
    if args.json:
        print(json.dumps({"cores": os.cpu_count(), "load": os.getloadavg()[0], "rows": rows, "hops": hops,
                          "fit": fit}))
        return
    print(f"cores: {os.cpu_count()}  load average: {os.getloadavg()[0]:.1f}  (medians of {args.reps}, ms)")
    print(f"{'message':<20}{'MB':>7}{'encode':>8}{'decode':>8}{'copying':>9}{'ratio':>7}{'relay':>8}"
          f"{'handling':>10}{'plan':>7}")
    for r in rows:
        print(f"{r['message']:<20}{r['bytes'] / 1e6:>7.2f}{r['encode_ms']:>8.2f}{r['decode_ms']:>8.2f}"
              f"{r['copying_decode_ms']:>9.2f}{r['copying_decode_ms'] / r['decode_ms']:>7.1f}{r['relay_ms']:>8.1f}"
              f"{r['handling_ms']:>10.1f}{r['plan_ms']:>7.1f}")
    print("ratio = copying decode / decode (views); handling = encode + decode + loopback relay;"
          " plan = selection.costs.handling_s")
    if hops:
        print(f"small.yaml feature hops ({len(hops)}; ms):")
        print(f"{'role':<6}{'device':<8}{'MB':>6}{'measured':>10}{'link':>8}{'excess':>8}{'s/MB/factor':>13}")
        for h in hops:
            print(f"{h['role']:<6}{h['device']:<8}{h['mb']:>6.2f}{1e3 * h['measured_s']:>10.1f}"
                  f"{1e3 * h['link_s']:>8.1f}{1e3 * h['excess_s']:>8.1f}{h['s_per_mb']:>13.4f}")
    print(f"{'per MB (s)':<28}{'measured':>10}{'constant':>10}{'ratio':>8}")
    for name, value in fit.items():
        print(f"{name:<28}{value:>10.4f}{HANDLING_S_PER_MB:>10.4f}{value / HANDLING_S_PER_MB:>8.2f}")


if __name__ == "__main__":
    main()
