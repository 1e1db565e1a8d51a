"""The 'digits' model: a class-conditional diffusers UNet2DModel trained on scikit-learn's 8x8 digits.

Role: the first embedded model, kept selectable (`--model digits`). The latent is the digit at the
data set's own 8x8 resolution (1 channel, values in [-1, 1]); the decoder is fixed, not learned:
bilinear upsampling x4 to a 32x32 image, a clamp and a cast. Class 10 is the null class used for
classifier-free guidance. `train_digits` is deterministic for a given seed and thread count.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from testbed.diffusion.training import TrainingLoop, deterministic_cpu
from testbed.model.prompts import parse_digit_prompt  # noqa: F401 - re-exported

__all__ = [
    "DIGITS_IMAGE_PX",
    "DIGITS_LATENT_PX",
    "DIGITS_NULL_CLASS",
    "DIGITS_UNET_CONFIG",
    "DIGITS_WEIGHTS_PATH",
    "EMBEDDED_SCHEDULER_CONFIG",
    "build_digits_unet",
    "digits_dataset",
    "digits_decode",
    "parse_digit_prompt",
    "train_digits",
]

DIGITS_LATENT_PX = 8
DIGITS_IMAGE_PX = 32
DIGITS_NULL_CLASS = 10
DIGITS_WEIGHTS_PATH = Path(__file__).resolve().parent.parent / "data" / "digits_unet.safetensors"

DIGITS_UNET_CONFIG: dict = {
    "sample_size": DIGITS_LATENT_PX,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": 32,
    "num_class_embeds": DIGITS_NULL_CLASS + 1,
}

# DDPM training schedule of both embedded models; every inference scheduler (DDIM, Euler, DPM,
# PNDM) is built from it. The squared-cosine schedule ends at alpha_bar(999) = 2e-9: starting
# there ("trailing") makes DDIM's x0 estimate amplify the noise prediction's error 20000x and the
# samples diverge (measured: latents of +-2000). "leading" + offset 1 starts at t = 981
# (alpha_bar 9e-4, the image weighs 3 % against the noise, as in SD1.5), and DDIM clips x0 to
# the data range.
EMBEDDED_SCHEDULER_CONFIG: dict = {
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


def digits_decode(latent: torch.Tensor) -> torch.Tensor:
    """The fixed decoder: (B, 1, 8, 8) latent -> (B, 1, 32, 32) image in [-1, 1]."""
    x = F.interpolate(latent.float(), size=(DIGITS_IMAGE_PX, DIGITS_IMAGE_PX), mode="bilinear", align_corners=False)
    return x.clamp(-1.0, 1.0)


def build_digits_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(**DIGITS_UNET_CONFIG)


def train_digits(
    out: Path = DIGITS_WEIGHTS_PATH,
    steps: int = 1200,
    batch: int = 96,
    lr: float = 2e-3,
    seed: int = 0,
    threads: int = 1,
    cond_drop: float = 0.1,
    log=print,
) -> dict:
    """Train the digits model (epsilon prediction, class dropout for CFG) and save safetensors.

    Deterministic: fixed seed, fixed thread count, deterministic torch algorithms.
    Returns a summary (final loss EMA, seconds, parameter count).
    """
    from diffusers import DDPMScheduler

    ema_decay = 0.995
    with deterministic_cpu(seed, threads):
        g = torch.Generator().manual_seed(seed)
        x_all, y_all = digits_dataset()
        unet = build_digits_unet()
        sched = DDPMScheduler(**EMBEDDED_SCHEDULER_CONFIG)
        loop = TrainingLoop(unet, steps, lr, ema_decay, log)
        unet.train()
        for it in range(steps):
            idx = torch.randint(0, len(x_all), (batch,), generator=g)
            x0, y = x_all[idx], y_all[idx].clone()
            drop = torch.rand(batch, generator=g) < cond_drop
            y[drop] = DIGITS_NULL_CLASS
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
            pred = unet(sched.add_noise(x0, noise, t), t, class_labels=y).sample
            loop.step(it, F.mse_loss(pred, noise))
    return loop.save(out, {
        "unet_config": DIGITS_UNET_CONFIG, "scheduler_config": EMBEDDED_SCHEDULER_CONFIG,
        "train": {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "threads": threads,
                  "cond_drop": cond_drop, "ema_decay": ema_decay, "dataset": "sklearn.load_digits"}})
