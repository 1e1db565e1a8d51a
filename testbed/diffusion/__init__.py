"""Diffusion workloads (CPU/GPU compute only): models, precision variants, stage and split runners, MS-SSIM.

Nothing here touches sockets or the kernel. Tensors at the boundary are plain float32 torch
tensors (class labels int64) and scheduler states are flat dicts of tensors and JSON-able
scalars, so the relay's safetensors wire format carries them as they are.
"""

from testbed.diffusion.models import (
    EMBEDDED_MODELS,
    LocalModel,
    conditioning_from_embeds,
    decode,
    encode_prompt,
    initial_latent,
    load_model,
    variant_sizes_bytes,
)
from testbed.diffusion.quality import generate, ms_ssim, msssim_upsample_factor, reference_image
from testbed.diffusion.quantize import PRECISIONS, canonical_precision, model_size_bytes
from testbed.diffusion.split import (
    SD15_UNET_CONFIG,
    SplitRunner,
    run_split,
    sd15_latent_bytes,
    sd15_split_bytes_per_step,
    split_step,
)
from testbed.diffusion.stages import SCHEDULERS, make_scheduler, num_schedule_steps, run_stage
from testbed.diffusion.digits import train_digits
from testbed.diffusion.tiny import train_tiny
from testbed.model.prompts import parse_colour_prompt, parse_digit_prompt

__all__ = [
    "EMBEDDED_MODELS",
    "PRECISIONS",
    "SCHEDULERS",
    "SD15_UNET_CONFIG",
    "LocalModel",
    "SplitRunner",
    "canonical_precision",
    "conditioning_from_embeds",
    "decode",
    "encode_prompt",
    "generate",
    "initial_latent",
    "load_model",
    "make_scheduler",
    "model_size_bytes",
    "ms_ssim",
    "msssim_upsample_factor",
    "num_schedule_steps",
    "parse_colour_prompt",
    "parse_digit_prompt",
    "reference_image",
    "run_split",
    "run_stage",
    "sd15_latent_bytes",
    "sd15_split_bytes_per_step",
    "split_step",
    "train_digits",
    "train_tiny",
    "variant_sizes_bytes",
]
