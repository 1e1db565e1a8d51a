"""A miniature SD1.5-style pipeline saved as a diffusers directory (random weights, no download).

UNet2DConditionModel + AutoencoderKL + scheduler; optionally a real CLIP tokenizer built from a
tiny BPE vocabulary and a small CLIPTextModel, so prompts go through the same code as SD1.5's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SD_SCHED = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
            "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}
TEXT_DIM = 32
WORDS = ("a", "photo", "of", "red", "cat", "on", "white", "background")


def save_mini_sd(d: Path, text_encoder: bool = False) -> Path:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, sample_size=16)
    unet.save_pretrained(d / "unet")
    vae.save_pretrained(d / "vae")
    (d / "scheduler").mkdir(parents=True)
    (d / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "PNDMScheduler", **SD_SCHED}))
    if text_encoder:
        _save_clip(d)
    return d


def _save_clip(d: Path) -> None:
    """CLIP's own tokenizer class on a BPE vocabulary that spells WORDS, and a 2-layer CLIP text model."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab: dict[str, int] = {}
    merges: list[str] = []

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for t in ("<|startoftext|>", "<|endoftext|>"):
        add(t)
    for c in sorted({c for w in WORDS for c in w}):
        add(c)
        add(c + "</w>")
    for w in WORDS:  # merge left to right: c a t</w> -> ca t</w> -> cat</w>
        parts = [*w[:-1], w[-1] + "</w>"]
        while len(parts) > 1:
            pair = f"{parts[0]} {parts[1]}"
            if pair not in merges:
                merges.append(pair)
            parts = [parts[0] + parts[1], *parts[2:]]
            add(parts[0])
    raw = d / "bpe"
    raw.mkdir()
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    CLIPTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"), model_max_length=16).save_pretrained(d / "tokenizer")
    torch.manual_seed(1)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    CLIPTextModel(cfg).save_pretrained(d / "text_encoder")
