"""The embedded 'tiny' model: coloured digits from a compositional prompt, trained here in minutes.

Role: the default workload on a fresh machine (no model hub). A text encoder (learned token and
position embeddings, one transformer layer) reads `a <colour> <digit> on a <colour> background`;
a diffusers UNet2DConditionModel denoises with cross-attention on its token states and the pooled
state added to the time embedding (diffusers' `class_embed_type="projection"`, passed as
`class_labels`). The latent is the 32 x 32 RGB image itself in [-1, 1], folded into 2 x 2 pixel
patches (12 x 16 x 16, `pixel_unshuffle`); the decoder unfolds it (`pixel_shuffle`): exact, fixed,
independent of the prompt, so digit and colours come from the denoiser alone.
Data: `glyphs.training_batch` (rendered on the spot). `train_tiny` is deterministic for a seed
and thread count.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from testbed.diffusion.digits import EMBEDDED_SCHEDULER_CONFIG
from testbed.diffusion.training import TrainingLoop, deterministic_cpu
from testbed.model.prompts import MAX_PROMPT_TOKENS, VOCABULARY, tokenize_prompt

__all__ = [
    "TINY_GUIDANCE_SCALE",
    "TINY_IMAGE_PX",
    "TINY_PATCH",
    "TINY_SCHEDULER_CONFIG",
    "TINY_TEXT_CONFIG",
    "TINY_UNET_CONFIG",
    "TINY_WEIGHTS_PATH",
    "TinyTextEncoder",
    "build_tiny_unet",
    "tiny_decode",
    "tiny_encode_image",
    "train_tiny",
]

TINY_IMAGE_PX = 32
TINY_PATCH = 2  # latent = 2 x 2 pixel patches: 3 * 4 channels at 16 x 16
TINY_GUIDANCE_SCALE = 1.5
TINY_WEIGHTS_PATH = Path(__file__).resolve().parent.parent / "data" / "tiny_unet.safetensors"
_TEXT_DIM = 64

# The embedded schedule, but v-prediction: with epsilon prediction the loss at high noise hardly
# depends on the image (x0's error weighs alpha_bar / (1 - alpha_bar), 2 % at t = 900), so the
# model never learnt what is decided there, the background and which colour goes where
# (measured: a white 2 on red for "a red 0 on a white background", DDPM 1000 steps).
TINY_SCHEDULER_CONFIG: dict = {**EMBEDDED_SCHEDULER_CONFIG, "prediction_type": "v_prediction"}

TINY_TEXT_CONFIG: dict = {
    "vocabulary": list(VOCABULARY),  # ids 3.. in this order; the loader refuses weights of another vocabulary
    "max_tokens": MAX_PROMPT_TOKENS,
    "dim": _TEXT_DIM,
    "heads": 4,
    "ff_dim": 128,
}

TINY_UNET_CONFIG: dict = {
    "sample_size": TINY_IMAGE_PX // TINY_PATCH,
    "in_channels": 3 * TINY_PATCH**2,
    "out_channels": 3 * TINY_PATCH**2,
    "layers_per_block": 1,
    "block_out_channels": (32, 64, 128),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": _TEXT_DIM,
    "attention_head_dim": 4,
    "norm_num_groups": 16,
    "class_embed_type": "projection",
    "projection_class_embeddings_input_dim": _TEXT_DIM,
}


class TinyTextEncoder(nn.Module):
    """Token ids (B, L) -> token states (B, L, dim) and the pooled state at the end token (B, dim)."""

    def __init__(self, vocabulary: list[str], max_tokens: int, dim: int, heads: int, ff_dim: int):
        super().__init__()
        self.token = nn.Embedding(len(vocabulary) + 3, dim)  # + pad, start, end
        self.position = nn.Parameter(torch.zeros(max_tokens, dim))
        self.layer = nn.TransformerEncoderLayer(dim, heads, ff_dim, dropout=0.0, batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from testbed.model.prompts import EOS_ID

        h = self.norm(self.layer(self.token(ids) + self.position[: ids.shape[1]]))
        end = (ids == EOS_ID).int().argmax(dim=1)
        return h, h[torch.arange(len(ids)), end]

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self(torch.tensor([tokenize_prompt(p) for p in prompts], dtype=torch.int64))


def build_tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**TINY_UNET_CONFIG)


def tiny_encode_image(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, 32, 32) image in [-1, 1] -> (B, 12, 16, 16) latent."""
    return F.pixel_unshuffle(image, TINY_PATCH)


def tiny_decode(latent: torch.Tensor) -> torch.Tensor:
    """The fixed decoder: (B, 12, 16, 16) latent -> (B, 3, 32, 32) image in [-1, 1]."""
    return F.pixel_shuffle(latent.float(), TINY_PATCH).clamp(-1.0, 1.0)


def train_tiny(
    out: Path = TINY_WEIGHTS_PATH,
    steps: int = 3750,
    batch: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    threads: int = 2,
    cond_drop: float = 0.1,
    min_snr_gamma: float = 5.0,
    snr_floor: float = 0.1,
    bf16: bool = True,
    log=print,
) -> dict:
    """Train text encoder and UNet together on freshly rendered prompts/images; save safetensors.

    v-prediction; each step's loss weighs its x0 error by SNR clamped to [snr_floor, gamma]
    (min-SNR-gamma, which converges faster on a short budget, with a floor: without it the
    weight falls as SNR at high noise, 0.006 at t = 951, and the model never learnt to take
    colours and layout from the prompt there -- measured: a seed, not the prompt, chose the
    background; a floor of 1.0 drowned the digit, hence 0.1). The forward pass runs under
    bfloat16 autocast (1.4x the samples per second of float32 on the 2-core Zen 4 CPU; weights,
    optimizer and loss stay float32). 10 % empty prompts for classifier-free guidance, EMA of the
    weights saved. Deterministic: fixed seed and thread count, deterministic torch algorithms.
    Two threads by default: the training is timed on an otherwise idle 2-core machine, where two
    threads gave 1.4x the steps per second of one (on cores shared with other work each step
    waits for the slower thread: pass threads=1 there; the result depends on the count).
    """
    from diffusers import DDPMScheduler

    from testbed.diffusion.fonts import TRAINING_FACES
    from testbed.diffusion.glyphs import training_batch

    ema_decay = 0.996
    # attention through the math kernel: the CPU flash kernel's backward in bfloat16 took 37 % of
    # a step (measured: math 0.34 s/step against 0.51 s, 2 threads; the same attention)
    with deterministic_cpu(seed, threads), sdpa_kernel(SDPBackend.MATH):
        g = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        model = nn.ModuleDict({"unet": build_tiny_unet(), "text": TinyTextEncoder(**TINY_TEXT_CONFIG)})
        sched = DDPMScheduler(**TINY_SCHEDULER_CONFIG)
        snr = sched.alphas_cumprod / (1 - sched.alphas_cumprod)
        # x0 error = v error / sqrt(SNR + 1): weigh it by SNR clamped to [floor, gamma]
        weight_of_t = snr.clamp(min=snr_floor, max=min_snr_gamma) / (snr + 1)
        loop = TrainingLoop(model, steps, lr, ema_decay, log)
        model.train()
        for it in range(steps):
            prompts, images = training_batch(batch, g, rng)
            prompts = ["" if rng.random() < cond_drop else p for p in prompts]
            x0 = tiny_encode_image(images)
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                states, pooled = model["text"].encode(prompts)
                pred = model["unet"](sched.add_noise(x0, noise, t), t, encoder_hidden_states=states,
                                     class_labels=pooled).sample.float()
            target = sched.get_velocity(x0, noise, t)
            loop.step(it, (weight_of_t[t] * ((pred - target) ** 2).mean(dim=(1, 2, 3))).mean())
    return loop.save(out, {
        "unet_config": TINY_UNET_CONFIG, "text_config": TINY_TEXT_CONFIG, "scheduler_config": TINY_SCHEDULER_CONFIG,
        "train": {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "threads": threads, "cond_drop": cond_drop,
                  "min_snr_gamma": min_snr_gamma, "snr_floor": snr_floor, "bf16_autocast": bf16, "ema_decay": ema_decay,
                  "dataset": "testbed.diffusion.glyphs (rendered)", "faces": [f.file for f in TRAINING_FACES]}})
