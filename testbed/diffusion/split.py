"""Split baseline: the UNet cut in two segments whose intermediate tensors cross the network each step.

Role: the paper's "split diffusion". Head = conv_in + time (and class) embedding + down blocks;
tail = mid block + up blocks + conv_out. `head` returns a dict of tensors (hidden state, every
skip connection, the time embedding and, for cross-attention models, the text conditioning);
`tail` turns it into the noise prediction. The two segments compute exactly what the whole UNet
computes (same modules, same order). `sd15_split_bytes_per_step` measures SD1.5's cut on the
meta device, so the stand-in payload is derived from the real architecture, not typed in.
"""

from __future__ import annotations

import functools

import torch

from testbed.errors import WorkloadError

__all__ = ["SD15_UNET_CONFIG", "SD15_VAE_SCALE_FACTOR", "SplitRunner", "run_split",
           "sd15_latent_bytes", "sd15_split_bytes_per_step", "split_step", "tensor_bytes"]

# SD1.5's unet/config.json (architecture fields; the rest are UNet2DConditionModel defaults)
SD15_UNET_CONFIG: dict = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32, "norm_eps": 1e-5,
    "act_fn": "silu", "center_input_sample": False, "downsample_padding": 1, "flip_sin_to_cos": True,
    "freq_shift": 0, "mid_block_scale_factor": 1,
}
# SD1.5's VAE has 4 resolution levels (block_out_channels 128, 256, 512, 512): 2**(4-1) = 8
SD15_VAE_SCALE_FACTOR = 2 ** (len((128, 256, 512, 512)) - 1)
SD15_TEXT_TOKENS = 77


def tensor_bytes(tensors: dict[str, torch.Tensor], dtype_bytes: int | None = None) -> int:
    return sum(t.numel() * (t.element_size() if dtype_bytes is None else dtype_bytes) for t in tensors.values())


class SplitRunner:
    """Two segments of one UNet (UNet2DModel or UNet2DConditionModel, plain configurations)."""

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self.cross = hasattr(unet.config, "cross_attention_dim") and unet.config.get("cross_attention_dim")
        c = unet.config
        for name in ("addition_embed_type", "encoder_hid_dim_type"):
            if c.get(name) is not None:
                raise WorkloadError(f"split runner: UNet config {name}={c.get(name)!r} is not supported")
        if c.get("class_embeddings_concat"):
            raise WorkloadError("split runner: class_embeddings_concat=True is not supported")
        if c.get("time_embedding_type", "positional") == "fourier" or c.get("center_input_sample"):
            raise WorkloadError("split runner: fourier time embedding / center_input_sample are not supported")
        self.bytes_per_step = 0

    # -- segment 1 ---------------------------------------------------------------------------
    def head(self, latent: torch.Tensor, t, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """conv_in + time embedding + down blocks; `latent` is the UNet input (CFG batch included)."""
        u = self.unet
        factor = 2 ** len([b for b in u.up_blocks if getattr(b, "upsamplers", None)])
        if any(d % factor for d in latent.shape[-2:]):
            raise WorkloadError(f"split runner: latent {tuple(latent.shape)} must be a multiple of {factor} px")
        t = torch.as_tensor(t, device=latent.device)
        timesteps = (t[None] if t.dim() == 0 else t).expand(latent.shape[0])
        t_emb = u.time_proj(timesteps).to(dtype=latent.dtype)
        emb = u.time_embedding(t_emb)
        labels = cond.get("class_labels")
        if u.class_embedding is not None:
            if labels is None:
                raise WorkloadError("split runner: this UNet is class-conditional; cond needs 'class_labels'")
            emb = emb + u.class_embedding(labels).to(dtype=latent.dtype)
        if getattr(u, "time_embed_act", None) is not None:
            emb = u.time_embed_act(emb)
        sample = u.conv_in(latent)
        skips = [sample]
        ehs = cond.get("encoder_hidden_states")
        for block in u.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=ehs)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            skips.extend(res)
        features = {"sample": sample, "emb": emb}
        features.update({f"skip.{i}": s for i, s in enumerate(skips)})
        if self.cross:
            features["encoder_hidden_states"] = ehs
        self.bytes_per_step = tensor_bytes(features)
        return features

    # -- segment 2 ---------------------------------------------------------------------------
    def tail(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """mid block + up blocks + conv_out -> noise prediction (the UNet's output)."""
        u = self.unet
        n = sum(1 for k in features if k.startswith("skip."))
        skips = tuple(features[f"skip.{i}"] for i in range(n))
        sample, emb = features["sample"], features["emb"]
        ehs = features.get("encoder_hidden_states")
        if u.mid_block is not None:
            if getattr(u.mid_block, "has_cross_attention", False):
                sample = u.mid_block(sample, emb, encoder_hidden_states=ehs)
            else:
                sample = u.mid_block(sample, emb)
        for block in u.up_blocks:
            res, skips = skips[-len(block.resnets):], skips[: -len(block.resnets)]
            if getattr(block, "has_cross_attention", False):
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=ehs)
            elif self.cross:
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res)
            else:
                sample = block(sample, res, emb)
        if u.conv_norm_out is not None:
            sample = u.conv_act(u.conv_norm_out(sample))
        return u.conv_out(sample)

    def predict(self, latent: torch.Tensor, t, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.tail(self.head(latent, t, cond))


def split_step(runner: SplitRunner, latent: torch.Tensor, t, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """One UNet evaluation through the two segments (what crosses between them: runner.bytes_per_step)."""
    return runner.predict(latent, t, cond)


def run_split(model, latent: torch.Tensor, cond: dict[str, torch.Tensor], total_steps: int,
              scheduler_kind: str = "ddim", guidance_scale: float | None = None) -> tuple[torch.Tensor, dict]:
    """A whole split run (head then tail at every step); returns the latent and the bytes per step."""
    from testbed.diffusion.stages import run_stage

    runner = SplitRunner(model.unet)
    x, _ = run_stage(model, latent, cond, 0, total_steps, total_steps, scheduler_kind,
                     guidance_scale=guidance_scale, predict=runner.predict)
    return x, {"bytes_per_step": runner.bytes_per_step,
               "return_bytes_per_step": x.numel() * 4 * (2 if model.has_cfg else 1)}


@functools.lru_cache(maxsize=32)
def sd15_split_bytes_per_step(resolution_px: int, dtype_bytes: int = 4, cfg_batch: int = 2) -> int:
    """Bytes SD1.5's head sends to its tail per step at `resolution_px`, from the UNet's shapes (meta device)."""
    from diffusers import UNet2DConditionModel

    if resolution_px % (SD15_VAE_SCALE_FACTOR * 8):
        raise WorkloadError(f"resolution_px={resolution_px}: SD1.5 needs a multiple of 64 px")
    side = resolution_px // SD15_VAE_SCALE_FACTOR
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        latent = torch.empty(cfg_batch, SD15_UNET_CONFIG["in_channels"], side, side)
        ehs = torch.empty(cfg_batch, SD15_TEXT_TOKENS, SD15_UNET_CONFIG["cross_attention_dim"])
    with torch.no_grad():
        features = SplitRunner(unet).head(latent, torch.tensor(999, device="meta"),
                                          {"encoder_hidden_states": ehs})
    return tensor_bytes(features, dtype_bytes)


def sd15_latent_bytes(resolution_px: int, dtype_bytes: int = 4) -> int:
    """Bytes of SD1.5's latent (4 x res/8 x res/8) at `resolution_px`, batch 1."""
    side = resolution_px // SD15_VAE_SCALE_FACTOR
    return SD15_UNET_CONFIG["in_channels"] * side * side * dtype_bytes
