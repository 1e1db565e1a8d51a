"""Model loading: the embedded models (tiny, digits) or Stable Diffusion v1.5 (local directory / HF cache, offline).

Role: turn a model name into a `LocalModel` (UNet at one precision, scheduler config, how to
encode a prompt, make the initial latent and decode). Tensors at the boundary are float32
(class labels int64); the UNet computes in the variant's dtype.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from testbed.diffusion.digits import DIGITS_NULL_CLASS, digits_decode
from testbed.diffusion.quantize import canonical_precision, compute_dtype, make_variant, model_size_bytes
from testbed.diffusion.tiny import tiny_decode
from testbed.errors import InputError, ResourceError, WorkloadError
from testbed.model.prompts import parse_digit_prompt

__all__ = [
    "LocalModel",
    "EMBEDDED_MODELS",
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
EMBEDDED_REFERENCE_STEPS = 50  # the reference image: fp32, 50 DDIM steps, as for SD1.5
# SD1.5's scheduler_config.json (PNDM); used when a model directory has no scheduler/ folder
SD15_SCHEDULER_CONFIG: dict = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
}


@dataclass
class LocalModel:
    """One model at one precision on one device."""

    name: str
    kind: str  # "tiny" (text-conditional, embedded), "digits" (class-conditional, embedded) or "sd"
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
        return {"digits": ("class_labels",), "tiny": ("encoder_hidden_states", "class_labels")}.get(
            self.kind, ("encoder_hidden_states",))


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
            f"model {name!r}: not {', '.join(map(repr, EMBEDDED_MODELS))}, 'sd15' or a diffusers model directory "
            "with unet/config.json; use --model tiny or point at a Stable Diffusion v1.5 directory"
        )
    return p


@dataclass(frozen=True)
class _Embedded:
    """An embedded model: its weights file, the command that makes it, how its modules are built."""

    path: Path
    train_command: str
    unet_class: str  # a diffusers class name
    text_encoder: bool
    guidance_scale: float


def _embedded_models() -> dict[str, _Embedded]:
    from testbed.diffusion.digits import DIGITS_WEIGHTS_PATH
    from testbed.diffusion.tiny import TINY_GUIDANCE_SCALE, TINY_WEIGHTS_PATH

    return {"tiny": _Embedded(TINY_WEIGHTS_PATH, "testbed train-tiny", "UNet2DConditionModel", True,
                              TINY_GUIDANCE_SCALE),
            "digits": _Embedded(DIGITS_WEIGHTS_PATH, "testbed train-tiny --model digits", "UNet2DModel", False, 2.0)}


EMBEDDED_MODELS = ("tiny", "digits")


@functools.lru_cache(maxsize=4)
def _weights_file(path: str, mtime_ns: int) -> tuple[dict, dict[str, torch.Tensor], str]:
    """(JSON metadata, tensors, short sha256) of an embedded model's safetensors file."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        state = {k: f.get_tensor(k) for k in f.keys()}
    return meta, state, hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _embedded_weights(name: str) -> tuple[_Embedded, dict, dict[str, torch.Tensor], str]:
    spec = _embedded_models()[name]
    if not spec.path.is_file():
        raise WorkloadError(f"{name} model weights {spec.path} are missing; run `{spec.train_command}` to make them")
    return (spec, *_weights_file(str(spec.path), spec.path.stat().st_mtime_ns))


def _load_embedded(name: str) -> tuple[torch.nn.Module, dict, str, torch.nn.Module | None]:
    """An embedded model's fp32 UNet, scheduler config, fingerprint and (tiny) text encoder."""
    import diffusers

    spec, meta, state, digest = _embedded_weights(name)
    with torch.device("meta"):  # no random initialisation of weights that are replaced at once (half the time)
        unet = getattr(diffusers, spec.unet_class)(**meta["unet_config"])
    prefix = "unet." if spec.text_encoder else ""
    unet.load_state_dict({k[len(prefix):]: v.clone() for k, v in state.items() if k.startswith(prefix)}, strict=True,
                         assign=True)
    left = [n for n, t in [*unet.named_parameters(), *unet.named_buffers()] if t.is_meta]
    if left:  # (a buffer that is not in the weights file would have no value: a diffusers change)
        raise WorkloadError(f"{spec.path}: the {spec.unet_class} has tensors the file does not hold: {left[:3]}")
    text = None
    if spec.text_encoder:
        from testbed.diffusion.tiny import TINY_TEXT_CONFIG, TinyTextEncoder

        if meta["text_config"]["vocabulary"] != TINY_TEXT_CONFIG["vocabulary"]:
            raise WorkloadError(f"{spec.path} was trained on another prompt vocabulary than this code reads; "
                                f"run `{spec.train_command}`")
        text = TinyTextEncoder(**meta["text_config"])
        text.load_state_dict({k[5:]: v.clone() for k, v in state.items() if k.startswith("text.")}, strict=True)
        text.requires_grad_(False).eval()
    return unet, meta["scheduler_config"], f"{name}-{digest}", text


def load_base_unet(name: str = "tiny") -> tuple[torch.nn.Module, dict, str, Path | None]:
    """The fp32 UNet of a model, its scheduler config, a fingerprint and (SD) its directory."""
    if name in EMBEDDED_MODELS:
        unet, scfg, fp, _ = _load_embedded(name)
        return unet, scfg, fp, None
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
    """Load a model and make its precision variant (fp32, fp16 = bf16 on CPU, int8, int4).

    Only the UNet becomes the variant: a text encoder runs once per prompt, in float32."""
    p = canonical_precision(precision)
    if name in EMBEDDED_MODELS:
        unet, scfg, fp, text = _load_embedded(name)
        unet = make_variant(unet, p, device)
        c = unet.config
        return LocalModel(
            name=name, kind=name, precision=p, device=device, unet=unet, scheduler_config=scfg,
            latent_shape=(c.in_channels, c.sample_size, c.sample_size), has_cfg=True,
            size_bytes=model_size_bytes(unet), reference_steps=EMBEDDED_REFERENCE_STEPS,
            default_guidance_scale=_embedded_models()[name].guidance_scale, fingerprint=fp,
            text_encoder=None if text is None else text.to(device),
        )
    unet, scfg, fp, d = load_base_unet(name)
    unet = make_variant(unet, p, device)
    vae = text_encoder = tokenizer = None
    extra: dict = {}
    if (d / "vae" / "config.json").is_file():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(d, subfolder="vae", local_files_only=True, torch_dtype=torch.float32)
        vae.requires_grad_(False).eval().to(device)
    if (d / "text_encoder").is_dir() and (d / "tokenizer").is_dir():
        try:
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError:
            extra["no_text_encoder"] = (
                f"model {name!r} has text_encoder/ and tokenizer/, but reading them needs the 'transformers' "
                "package: pip install -e '.[sd15]' (or pass prompt embeddings via conditioning_from_embeds())")
        else:
            try:
                tokenizer = CLIPTokenizer.from_pretrained(d, subfolder="tokenizer", local_files_only=True)
                text_encoder = CLIPTextModel.from_pretrained(d, subfolder="text_encoder", local_files_only=True)
            except Exception as e:  # noqa: BLE001 - translate transformers/OSError into one readable error
                raise WorkloadError(f"model {name!r}: cannot load the text encoder or tokenizer from {d}: {e}") from e
            text_encoder.requires_grad_(False).eval().to(device)
    c = unet.config
    return LocalModel(
        name=name, kind="sd", precision=p, device=device, unet=unet, scheduler_config=scfg,
        latent_shape=(c.in_channels, c.sample_size, c.sample_size), has_cfg=True,
        size_bytes=model_size_bytes(unet), reference_steps=SD_REFERENCE_STEPS, default_guidance_scale=7.5,
        fingerprint=fp, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, extra=extra,
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
    """Conditioning tensors (float32, batch 1) and their unconditional twins ('uncond_' + key):
    tiny: the text encoder's token states and pooled state (empty prompt = unconditional);
    digits: the digit's class label (class 10 = unconditional); SD: CLIP's text embeddings."""
    if model.kind == "digits":
        return {"class_labels": torch.tensor([parse_digit_prompt(prompt)], dtype=torch.int64),
                "uncond_class_labels": torch.tensor([DIGITS_NULL_CLASS], dtype=torch.int64)}
    if model.kind == "tiny":
        with torch.no_grad():
            states, pooled = model.text_encoder.encode([prompt, ""])
        states, pooled = states.float().cpu(), pooled.float().cpu()
        return {"encoder_hidden_states": states[:1], "uncond_encoder_hidden_states": states[1:],
                "class_labels": pooled[:1], "uncond_class_labels": pooled[1:]}
    if "no_text_encoder" in model.extra:
        raise ResourceError(model.extra["no_text_encoder"])
    if model.text_encoder is None or model.tokenizer is None:
        raise WorkloadError(f"model {model.name!r} has no text encoder (text_encoder/ + tokenizer/ folders); "
                            "pass prompt embeddings via conditioning_from_embeds()")

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
    """Latent -> uint8 image: (H, W, 3) RGB for tiny and SD, (H, W) grey for digits; a batch gives (B, ...)."""
    with torch.no_grad():
        if model.kind == "digits":
            img = digits_decode(latent.float())[:, 0]  # (B, H, W) in [-1, 1]
        elif model.kind == "tiny":
            img = tiny_decode(latent.float()).permute(0, 2, 3, 1)
        else:
            if model.vae is None:
                raise WorkloadError(f"model {model.name!r} has no vae/ folder; it cannot decode latents to images")
            x = model.vae.decode(latent.float().to(model.device) / model.vae.config.scaling_factor).sample
            img = x.clamp(-1, 1).permute(0, 2, 3, 1).cpu()
    arr = ((img.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return arr[0] if arr.shape[0] == 1 else arr


def model_fingerprint(name: str) -> str:
    """Changes when the model's weights change (embedded: file hash; SD: directory + unet config time)."""
    if name in EMBEDDED_MODELS:
        return f"{name}-{_embedded_weights(name)[3]}"
    d = _resolve_sd_dir(name)
    stat = (d / "unet" / "config.json").stat()
    return "sd-" + hashlib.sha256(f"{d.resolve()}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def variant_sizes_bytes(model_name: str = "tiny") -> dict[str, int]:
    """True size in bytes of each precision variant (the selection's S_j).

    Embedded models build the variants; 'sd15-meta' (or 'sd15' / a directory, whose sizes depend
    only on the architecture) builds them on torch's meta device from the UNet config, no weights needed.
    """
    from testbed.diffusion.quantize import PRECISIONS

    if model_name in EMBEDDED_MODELS:
        return {p: load_model(model_name, p).size_bytes for p in PRECISIONS}
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
