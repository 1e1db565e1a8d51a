"""The worker of bench/gpu.py: one process under one GPU share (set in its environment
before its first CUDA call). It builds every model variant and step it is given, then
times each when the parent says `go` on its stdin, so that workers run side by side;
messages go to the parent as JSON lines on its stdout.

    python3 bench/gpu_worker.py CONFIG_JSON     (started by bench/gpu.py)
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PROMPT = "a red 3 on a white background"
SD_TOKENS = 77
#: An SD1.5-shaped UNet small enough for a CPU (--dry-run): same blocks, few channels.
DRY_SD_CONFIG = {"block_out_channels": (32, 32, 32, 32), "layers_per_block": 1, "cross_attention_dim": 32,
                 "attention_head_dim": 2, "sample_size": 8}


def combo_key(c: dict) -> str:
    return f"{c['model']}/{c['precision']}/{c['mode']}/b{c['batch']}"


def _half_dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def _sd_inputs(device: str, batch: int, dry: bool, px: int):
    import torch
    from diffusers import UNet2DConditionModel

    from testbed.diffusion.split import SD15_UNET_CONFIG

    cfg = {**SD15_UNET_CONFIG, **(DRY_SD_CONFIG if dry else {})}
    side = cfg["sample_size"] if dry else px // 8
    with torch.device(device):
        unet = UNet2DConditionModel(**cfg)
    kw = {"encoder_hidden_states": torch.randn(batch, SD_TOKENS, cfg["cross_attention_dim"], device=device)}
    return unet, torch.randn(batch, cfg["in_channels"], side, side, device=device), kw


def _tiny_inputs(device: str, batch: int):
    import torch

    from testbed.diffusion.models import encode_prompt, load_base_unet, load_model
    from testbed.diffusion.stages import unet_conditioning

    unet = load_base_unet("tiny")[0]
    cond = encode_prompt(load_model("tiny", "fp32", "cpu"), PROMPT)  # its text encoder makes ids on the CPU
    kw = {k: v.to(device) for k, v in unet_conditioning(cond, batch // 2, cfg=True).items()}
    c = unet.config
    return unet, torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, device=device), kw


def build_unet(model: str, precision: str, device: str, batch: int, dry: bool, px: int):
    """(variant UNet on `device`, latent batch, keyword tensors) of `model` at `precision`."""
    from testbed.diffusion.quantize import make_variant

    unet, x, kw = _sd_inputs(device, batch, dry, px) if model == "sd15" else _tiny_inputs(device, batch)
    base = {"bf16": "fp16"}.get(precision, precision)
    return make_variant(unet, base, device, half_dtype=_half_dtype(precision)), x, kw


def make_step(unet, x, kw, mode: str, device: str):
    """A no-argument callable that runs one step: the eager call, or a CUDA graph's replay."""
    import torch

    t = torch.full((x.shape[0],), 500, device=device, dtype=torch.int64)

    def eager():
        with torch.no_grad():
            return unet(x, t, **kw).sample

    if mode == "eager":
        return eager
    if device != "cuda":
        raise RuntimeError("CUDA graphs need a GPU (--dry-run times eager calls only)")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up off the capture: allocator and kernel selection settle
            eager()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        eager()
    return graph.replay


def measure(step, sync, window_s: float, chunk_s: float = 0.02) -> tuple[float, int]:
    """(seconds per step, steps) over at least `window_s` of back-to-back steps, synchronised
    every ~chunk_s so that a waiting CPU never starves the GPU and the end is exact."""
    step()
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    chunk = max(1, min(1000, int(chunk_s / max(time.perf_counter() - t0, 1e-6))))
    n, t0 = 0, time.perf_counter()
    while True:
        for _ in range(chunk):
            step()
        sync()
        n += chunk
        elapsed = time.perf_counter() - t0
        if elapsed >= window_s:
            return elapsed / n, n


def worker(cfg: dict) -> int:
    """Build every combination, then time each when the parent says `go` (stdin). Messages
    go to the parent as JSON lines on the original stdout; library output goes to stderr."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def send(**msg) -> None:
        proto.write(json.dumps(msg) + "\n")

    try:
        import torch

        device = cfg["device"]
        torch.manual_seed(0)  # random weights and inputs, the same in every worker
        if device == "cuda":
            torch.zeros(1, device="cuda")  # the first CUDA call: the MPS client is made now, with this share
            torch.cuda.synchronize()
            gpu = torch.cuda.get_device_name(0)
        else:
            torch.set_num_threads(1)
            gpu = "cpu (dry run)"
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        models: dict[tuple, tuple] = {}
        steps: dict[str, object] = {}
        for c in cfg["combos"]:
            try:
                mk = (c["model"], c["precision"])
                if mk not in models:
                    models[mk] = build_unet(c["model"], c["precision"], device, c["batch"], cfg["dry_run"], cfg["px"])
                steps[combo_key(c)] = make_step(*models[mk], c["mode"], device)
            except Exception as e:  # noqa: BLE001 - reported in this combination's row
                steps[combo_key(c)] = f"{type(e).__name__}: {e}"
        if cfg.get("uid") is not None:  # as the agents: CUDA made as root, then a node uid for good
            from testbed.emulation.node_uids import drop_privileges

            drop_privileges(int(cfg["uid"]))
        send(setup={"setup_s": time.perf_counter() - t0, "gpu": gpu, "uid": os.getuid(), "torch": torch.__version__,
                    "share_env": os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")})
        for c in cfg["combos"]:
            key = combo_key(c)
            send(ready=key)
            if sys.stdin.readline().strip() != "go":
                return 3
            step = steps[key]
            row = dict(c)
            if isinstance(step, str):
                row["error"] = step
            else:
                try:
                    row["step_s"], row["calls"] = measure(step, sync, cfg["window_s"])
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {e}"
            send(result=row)
        send(done=True)
        return 0
    except Exception:  # noqa: BLE001 - the parent prints it
        send(error=traceback.format_exc())
        return 1


def step_flops(model: str, batch: int, px: int, dry: bool) -> float:
    """FLOPs of one UNet call, counted on the meta device (fp32 graph; a variant's
    dequantization is not counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    device = "meta"
    if model == "sd15":
        unet, x, kw = _sd_inputs(device, batch, dry, px)
    else:
        from diffusers import UNet2DConditionModel

        from testbed.diffusion.tiny import TINY_TEXT_CONFIG, TINY_UNET_CONFIG

        with torch.device(device):
            unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
            c = unet.config
            x = torch.empty(batch, c.in_channels, c.sample_size, c.sample_size)
            kw = {"encoder_hidden_states": torch.empty(batch, TINY_TEXT_CONFIG["max_tokens"], c.cross_attention_dim),
                  "class_labels": torch.empty(batch, c.projection_class_embeddings_input_dim)}
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        unet(x, torch.full((batch,), 500, device=device), **kw)
    return float(fc.get_total_flops())


if __name__ == "__main__":
    sys.exit(worker(json.loads(sys.argv[1])))
