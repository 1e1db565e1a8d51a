"""Model loading: the embedded tiny model or Stable Diffusion v1.5 (local directory / HF cache, offline).

Role: turn a model name into a `LocalModel` (UNet at one precision, scheduler config, how to
encode a prompt, make the initial latent and decode). Tensors at the boundary are float32
(class labels int64); the UNet computes in the variant's dtype.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from testbed.diffusion.quantize import canonical_precision, compute_dtype, make_variant, model_size_bytes
from testbed.diffusion.tiny import (
    TINY_NULL_CLASS,
    TINY_REFERENCE_STEPS,
    TINY_WEIGHTS_PATH,
    parse_digit_prompt,
    tiny_decode,
)
from testbed.errors import InputError, WorkloadError

__all__ = [
    "LocalModel",
    "SD15_REPO_IDS",
    "conditioning_from_embeds",
    "decode",
    "encode_prompt",
    "initial_latent",
    "load_base_unet",
    "load_model",
    "model_fingerprint",
    "torch_threads",
    "variant_sizes_bytes",
]

SD15_REPO_IDS = ("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5")
SD_REFERENCE_STEPS = 50
# SD1.5's scheduler_config.json (PNDM); used when a model directory has no scheduler/ folder
SD15_SCHEDULER_CONFIG: dict = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
}


@dataclass
class LocalModel:
    """One model at one precision on one device."""

    name: str
    kind: str  # "tiny" (class-conditional UNet2DModel) or "sd" (UNet2DConditionModel + VAE)
    precision: str
    device: str
    unet: torch.nn.Module
    scheduler_config: dict
    latent_shape: tuple[int, int, int]
    has_cfg: bool
    size_bytes: int
    reference_steps: int
    default_guidance_scale: float
    fingerprint: str
    vae: torch.nn.Module | None = None
    text_encoder: object | None = None
    tokenizer: object | None = None
    extra: dict = field(default_factory=dict)

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.precision, self.device)

    @property
    def cond_keys(self) -> tuple[str, ...]:
        return ("class_labels",) if self.kind == "tiny" else ("encoder_hidden_states",)


def _resolve_sd_dir(name: str) -> Path:
    if name in ("sd15", "sd1.5", "stable-diffusion-v1-5") or name in SD15_REPO_IDS:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from huggingface_hub import snapshot_download

        ids = SD15_REPO_IDS if name not in SD15_REPO_IDS else (name,)
        for repo in ids:
            try:
                return Path(snapshot_download(repo, local_files_only=True))
            except Exception:  # noqa: BLE001 - not in the cache: try the next id, then fail below
                continue
        raise WorkloadError(
            f"model {name!r}: Stable Diffusion v1.5 is not in the Hugging Face cache ({', '.join(ids)}) and "
            "no hub is reachable; pass a local model directory (with unet/ and scheduler/) or use --model tiny"
        )
    p = Path(name).expanduser()
    if not (p / "unet" / "config.json").is_file():
        raise InputError(
            f"model {name!r}: not 'tiny', 'sd15' or a diffusers model directory with unet/config.json; "
            "use --model tiny or point at a Stable Diffusion v1.5 directory"
        )
    return p


@functools.lru_cache(maxsize=4)
def _tiny_state(path: str, mtime_ns: int) -> tuple[dict, dict, dict[str, torch.Tensor], str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    return json.loads(meta["unet_config"]), json.loads(meta["scheduler_config"]), state, digest


def load_base_unet(name: str = "tiny") -> tuple[torch.nn.Module, dict, str, Path | None]:
    """The fp32 UNet of a model, its scheduler config, a fingerprint and (SD) its directory."""
    if name == "tiny":
        path = TINY_WEIGHTS_PATH
        if not path.is_file():
            raise WorkloadError(f"tiny model weights {path} are missing; run `testbed train-tiny` to make them")
        ucfg, scfg, state, digest = _tiny_state(str(path), path.stat().st_mtime_ns)
        from diffusers import UNet2DModel

        unet = UNet2DModel(**ucfg)
        unet.load_state_dict(copy.deepcopy(state), strict=True)
        return unet, scfg, f"tiny-{digest}", None
    d = _resolve_sd_dir(name)
    from diffusers import UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.from_pretrained(d, subfolder="unet", local_files_only=True,
                                                    torch_dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - translate diffusers/OSError into one readable error
        raise WorkloadError(f"model {name!r}: cannot load the UNet from {d / 'unet'}: {e}") from e
    sfile = d / "scheduler" / "scheduler_config.json"
    scfg = json.loads(sfile.read_text()) if sfile.is_file() else dict(SD15_SCHEDULER_CONFIG)
    return unet, scfg, model_fingerprint(str(d)), d


def load_model(name: str = "tiny", precision: str = "fp32", device: str = "cpu") -> LocalModel:
    """Load a model and make its precision variant (fp32, fp16 = bf16 on CPU, int8, int4)."""
    p = canonical_precision(precision)
    unet, scfg, fp, d = load_base_unet(name)
    unet = make_variant(unet, p, device)
    if d is None:
        c = unet.config
        return LocalModel(
            name="tiny", kind="tiny", precision=p, device=device, unet=unet, scheduler_config=scfg,
            latent_shape=(c.in_channels, c.sample_size, c.sample_size), has_cfg=True,
            size_bytes=model_size_bytes(unet), reference_steps=TINY_REFERENCE_STEPS,
            default_guidance_scale=2.0, fingerprint=fp,
        )
    vae = text_encoder = tokenizer = None
    if (d / "vae" / "config.json").is_file():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(d, subfolder="vae", local_files_only=True, torch_dtype=torch.float32)
        vae.requires_grad_(False).eval().to(device)
    if (d / "text_encoder").is_dir() and (d / "tokenizer").is_dir():
        try:
            from transformers import CLIPTextModel, CLIPTokenizer

            tokenizer = CLIPTokenizer.from_pretrained(d, subfolder="tokenizer", local_files_only=True)
            text_encoder = CLIPTextModel.from_pretrained(d, subfolder="text_encoder", local_files_only=True)
            text_encoder.requires_grad_(False).eval().to(device)
        except ImportError:
            pass  # encode_prompt says so; callers can pass prompt embeddings
    c = unet.config
    return LocalModel(
        name=name, kind="sd", precision=p, device=device, unet=unet, scheduler_config=scfg,
        latent_shape=(c.in_channels, c.sample_size, c.sample_size), has_cfg=True,
        size_bytes=model_size_bytes(unet), reference_steps=SD_REFERENCE_STEPS, default_guidance_scale=7.5,
        fingerprint=fp, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
    )


def conditioning_from_embeds(prompt_embeds: torch.Tensor,
                             negative_prompt_embeds: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Conditioning of an SD model from text embeddings (B, 77, D); the negative defaults to zeros."""
    pe = prompt_embeds.detach().float()
    ne = torch.zeros_like(pe) if negative_prompt_embeds is None else negative_prompt_embeds.detach().float()
    if ne.shape != pe.shape:
        raise WorkloadError(f"negative_prompt_embeds shape {tuple(ne.shape)} != prompt_embeds {tuple(pe.shape)}")
    return {"encoder_hidden_states": pe, "uncond_encoder_hidden_states": ne}


def encode_prompt(model: LocalModel, prompt: str) -> dict[str, torch.Tensor]:
    """Conditioning tensors: {'class_labels', 'uncond_class_labels'} (tiny) or the text embeddings (SD)."""
    if model.kind == "tiny":
        digit = parse_digit_prompt(prompt)
        return {"class_labels": torch.tensor([digit], dtype=torch.int64),
                "uncond_class_labels": torch.tensor([TINY_NULL_CLASS], dtype=torch.int64)}
    if model.text_encoder is None or model.tokenizer is None:
        raise WorkloadError(
            f"model {model.name!r} has no usable text encoder (text_encoder/ + tokenizer/ and the "
            "'transformers' package are needed); pass prompt embeddings via conditioning_from_embeds()"
        )

    def embed(text: str) -> torch.Tensor:
        ids = model.tokenizer(text, padding="max_length", max_length=model.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return model.text_encoder(ids.to(model.device))[0].float().cpu()

    return conditioning_from_embeds(embed(prompt), embed(""))


def initial_latent(model: LocalModel, seed: int, batch: int = 1) -> torch.Tensor:
    """Unit-variance Gaussian noise from the seed (CPU generator, float32); run_stage scales it."""
    g = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn((batch, *model.latent_shape), generator=g, dtype=torch.float32)


def decode(model: LocalModel, latent: torch.Tensor) -> np.ndarray:
    """Latent -> uint8 image (H, W) for tiny, (H, W, 3) for SD; a batch gives (B, H, W[, 3])."""
    with torch.no_grad():
        if model.kind == "tiny":
            img = tiny_decode(latent.float())[:, 0]  # (B, H, W) in [-1, 1]
        else:
            if model.vae is None:
                raise WorkloadError(f"model {model.name!r} has no vae/ folder; it cannot decode latents to images")
            x = model.vae.decode(latent.float().to(model.device) / model.vae.config.scaling_factor).sample
            img = x.clamp(-1, 1).permute(0, 2, 3, 1).cpu()
    arr = ((img.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return arr[0] if arr.shape[0] == 1 else arr


def model_fingerprint(name: str) -> str:
    """Changes when the model's weights change (tiny: file hash; SD: directory + unet config time)."""
    if name == "tiny":
        if not TINY_WEIGHTS_PATH.is_file():
            raise WorkloadError(f"tiny model weights {TINY_WEIGHTS_PATH} are missing; run `testbed train-tiny`")
        return "tiny-" + _tiny_state(str(TINY_WEIGHTS_PATH), TINY_WEIGHTS_PATH.stat().st_mtime_ns)[3]
    d = _resolve_sd_dir(name)
    stat = (d / "unet" / "config.json").stat()
    return "sd-" + hashlib.sha256(f"{d.resolve()}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def variant_sizes_bytes(model_name: str = "tiny") -> dict[str, int]:
    """True size in bytes of each precision variant (the selection's S_j).

    'tiny' builds the variants; 'sd15-meta' (or 'sd15' / a directory, whose sizes depend only on
    the architecture) builds them on torch's meta device from the UNet config, no weights needed.
    """
    from testbed.diffusion.quantize import PRECISIONS

    if model_name == "tiny":
        return {p: load_model("tiny", p).size_bytes for p in PRECISIONS}
    from diffusers import UNet2DConditionModel

    if model_name in ("sd15-meta", "sd15", "sd1.5") or model_name in SD15_REPO_IDS:
        from testbed.diffusion.split import SD15_UNET_CONFIG

        cfg = dict(SD15_UNET_CONFIG)
    else:
        cfg = json.loads((_resolve_sd_dir(model_name) / "unet" / "config.json").read_text())
    sizes = {}
    for p in PRECISIONS:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(cfg)
        sizes[p] = model_size_bytes(make_variant(unet, p, "meta"))
    return sizes


@contextlib.contextmanager
def torch_threads(n: int):
    """Run with `n` torch CPU threads (then restore): on cores shared with other work, more
    OpenMP threads than the CPU share spin against each other (5-20x slower, measured)."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)
