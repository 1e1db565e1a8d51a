"""Quality: MS-SSIM of a final image against the fixed reference (fp32, reference_steps, same seed/prompt).

Role: the quality figure of a run. pytorch-msssim's 5 scales with an 11-px window need images
larger than 160 px; smaller images (the tiny model's 32 x 32) are upsampled by the smallest
integer factor that makes the short side >= 161 px, with nearest-neighbour (pixel replication,
so no interpolation blurs either image), and the image and the reference get the same factor.
References are cached on disk (TESTBED_CACHE_DIR, default ~/.cache/testbed/references) under a
key that includes the model's weights fingerprint.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from testbed.errors import WorkloadError

__all__ = ["MSSSIM_MIN_PX", "generate", "ms_ssim", "msssim_upsample_factor", "reference_image"]

MSSSIM_MIN_PX = 161  # pytorch-msssim asserts min side > (win_size - 1) * 2**4 = 160


def msssim_upsample_factor(height: int, width: int) -> int:
    return max(1, math.ceil(MSSSIM_MIN_PX / min(height, width)))


def _as_batch(img: np.ndarray) -> torch.Tensor:
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.dtype != np.uint8:
        raise WorkloadError(f"ms_ssim: expected a uint8 image (H, W) or (H, W, C), got {a.dtype} {a.shape}")
    return torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float()


def ms_ssim(image: np.ndarray, reference: np.ndarray) -> float:
    """MS-SSIM in [0, 1] of two uint8 images of the same shape (data range 255)."""
    from pytorch_msssim import ms_ssim as _ms_ssim

    x, y = _as_batch(image), _as_batch(reference)
    if x.shape != y.shape:
        raise WorkloadError(f"ms_ssim: image {tuple(x.shape)} and reference {tuple(y.shape)} differ in shape")
    k = msssim_upsample_factor(x.shape[-2], x.shape[-1])
    if k > 1:
        x = F.interpolate(x, scale_factor=k, mode="nearest")
        y = F.interpolate(y, scale_factor=k, mode="nearest")
    return float(_ms_ssim(x, y, data_range=255.0, size_average=True))


def generate(model, prompt: str, seed: int, steps: int, scheduler_kind: str = "ddim",
             guidance_scale: float | None = None) -> np.ndarray:
    """One uninterrupted local generation -> uint8 image."""
    from testbed.diffusion.models import decode, encode_prompt, initial_latent
    from testbed.diffusion.stages import run_stage

    latent, _ = run_stage(model, initial_latent(model, seed), encode_prompt(model, prompt), 0, steps, steps,
                          scheduler_kind, guidance_scale=guidance_scale)
    return decode(model, latent)


def _cache_dir() -> Path:
    return Path(os.environ.get("TESTBED_CACHE_DIR", Path.home() / ".cache" / "testbed")) / "references"


def reference_image(model_name: str = "tiny", prompt: str = "a handwritten 7", seed: int = 0,
                    steps: int | None = None, scheduler_kind: str = "ddim",
                    guidance_scale: float | None = None) -> np.ndarray:
    """The fixed reference: fp32, `steps` (default: the model's reference_steps) DDIM steps; cached on disk."""
    import hashlib

    from PIL import Image

    from testbed.diffusion.models import load_model, model_fingerprint

    fp = model_fingerprint(model_name)
    key = hashlib.sha256(repr((fp, prompt, int(seed), steps, scheduler_kind, guidance_scale)).encode()).hexdigest()[:20]
    path = _cache_dir() / f"{key}.png"
    if path.is_file():
        return np.asarray(Image.open(path))
    model = load_model(model_name, "fp32")
    img = generate(model, prompt, seed, steps or model.reference_steps, scheduler_kind, guidance_scale)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.png")
        Image.fromarray(img).save(tmp)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs recomputation
    return img
