"""The embedded 'tiny' model: a class-conditional diffusers UNet2DModel trained on scikit-learn's digits.

Role: the default workload on a fresh machine (no model hub). The latent is the digit at the
data set's own 8x8 resolution (1 channel, values in [-1, 1]); the decoder is fixed, not learned:
bilinear upsampling x4 to a 32x32 image, a clamp and a cast. Class 10 is the null class used for classifier-free guidance.
`train_tiny` is deterministic for a given seed and thread count.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from testbed.model.prompts import parse_digit_prompt  # noqa: F401 - re-exported

__all__ = [
    "TINY_IMAGE_PX",
    "TINY_LATENT_PX",
    "TINY_NULL_CLASS",
    "TINY_REFERENCE_STEPS",
    "TINY_SCHEDULER_CONFIG",
    "TINY_UNET_CONFIG",
    "TINY_WEIGHTS_PATH",
    "digits_dataset",
    "build_tiny_unet",
    "tiny_decode",
    "parse_digit_prompt",
    "train_tiny",
]

TINY_LATENT_PX = 8
TINY_IMAGE_PX = 32
TINY_NULL_CLASS = 10
TINY_REFERENCE_STEPS = 50
TINY_WEIGHTS_PATH = Path(__file__).resolve().parent.parent / "data" / "tiny_unet.safetensors"

TINY_UNET_CONFIG: dict = {
    "sample_size": TINY_LATENT_PX,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": 32,
    "num_class_embeds": TINY_NULL_CLASS + 1,
}

# DDPM training schedule; every inference scheduler (DDIM, Euler, DPM, PNDM) is built from it.
# The squared-cosine schedule ends at alpha_bar(999) = 2e-9: starting there ("trailing") makes
# DDIM's x0 estimate amplify the noise prediction's error 20000x and the samples diverge
# (measured: latents of +-2000). "leading" + offset 1 starts at t = 981 (alpha_bar 9e-4, the
# image weighs 3 % against the noise, as in SD1.5), and DDIM clips x0 to the data range.
TINY_SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "clip_sample": True,
}

def digits_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (N, 1, 8, 8) float32 latents in [-1, 1] and (N,) int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # 0..1
    return x * 2.0 - 1.0, torch.tensor(d.target, dtype=torch.int64)


def tiny_decode(latent: torch.Tensor) -> torch.Tensor:
    """The fixed decoder: (B, 1, 8, 8) latent -> (B, 1, 32, 32) image in [-1, 1]."""
    x = F.interpolate(latent.float(), size=(TINY_IMAGE_PX, TINY_IMAGE_PX), mode="bilinear", align_corners=False)
    return x.clamp(-1.0, 1.0)


def build_tiny_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(**TINY_UNET_CONFIG)


def train_tiny(
    out: Path = TINY_WEIGHTS_PATH,
    steps: int = 1200,
    batch: int = 96,
    lr: float = 2e-3,
    seed: int = 0,
    threads: int = 1,
    cond_drop: float = 0.1,
    log=print,
) -> dict:
    """Train the tiny model (epsilon prediction, class dropout for CFG) and save safetensors.

    Deterministic: fixed seed, fixed thread count, deterministic torch algorithms.
    Returns a summary (final loss EMA, seconds, parameter count).
    """
    from diffusers import DDPMScheduler
    from safetensors.torch import save_file

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # denormal AdamW states slow CPU kernels by 10x and more
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    try:
        g = torch.Generator().manual_seed(seed)
        x_all, y_all = digits_dataset()
        unet = build_tiny_unet()
        sched = DDPMScheduler(**TINY_SCHEDULER_CONFIG)
        opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
        warm = max(1, steps // 20)
        lr_at = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay to 5 %
            opt, lambda i: min(1.0, (i + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))))
        ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        ema_decay = 0.995
        loss_ema = None
        t0 = time.perf_counter()
        unet.train()
        for it in range(steps):
            idx = torch.randint(0, len(x_all), (batch,), generator=g)
            x0, y = x_all[idx], y_all[idx].clone()
            drop = torch.rand(batch, generator=g) < cond_drop
            y[drop] = TINY_NULL_CLASS
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
            xt = sched.add_noise(x0, noise, t)
            pred = unet(xt, t, class_labels=y).sample
            loss = F.mse_loss(pred, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            lr_at.step()
            with torch.no_grad():
                for k, v in unet.state_dict().items():
                    if v.dtype.is_floating_point:
                        ema[k].mul_(ema_decay).add_(v.detach(), alpha=1 - ema_decay)
                    else:
                        ema[k].copy_(v)
            loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
            if log and (it % 100 == 0 or it == steps - 1):
                log(f"step {it:5d}/{steps}  loss {loss_ema:.4f}  {time.perf_counter() - t0:6.1f} s")
    finally:
        # Both are process-wide: leave them as found (flush-to-zero would break any later
        # code that needs subnormal floats, e.g. hypothesis' float strategies).
        torch.use_deterministic_algorithms(False)
        torch.set_flush_denormal(False)
    meta = {
        "unet_config": json.dumps(TINY_UNET_CONFIG),
        "scheduler_config": json.dumps(TINY_SCHEDULER_CONFIG),
        "train": json.dumps({"steps": steps, "batch": batch, "lr": lr, "seed": seed, "threads": threads,
                             "cond_drop": cond_drop, "ema_decay": ema_decay, "dataset": "sklearn.load_digits"}),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ema.items()}, str(out), metadata=meta)
    n_params = sum(p.numel() for p in unet.parameters())
    return {"path": str(out), "loss": loss_ema, "seconds": time.perf_counter() - t0, "params": n_params}
