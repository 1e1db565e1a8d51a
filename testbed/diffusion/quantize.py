"""Precision variants made locally from one fp32 model: fp32, fp16 (bf16 on a CPU), int8, int4.

fp16: every Conv2d and Linear holds its weight and bias in half precision (bfloat16 on a CPU,
where float16 kernels are unusably slow) and computes in it; its output returns to float32, so
norms, softmax and residual sums stay float32 (what autocast does; pure bf16 everywhere loses
4x more MS-SSIM on the tiny model, measured).

int8/int4: every Conv2d and Linear weight is quantized per output channel, symmetric
(int8: q in [-127, 127], scale = max|w| / 127; int4: q in [-7, 7], two per byte), and kept
quantized in memory; each forward dequantizes the weight to float32 and runs the float op.
Biases, norms and embeddings stay float32. Sizes are counted from what the module holds.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from testbed.errors import WorkloadError

__all__ = [
    "PRECISIONS",
    "HalfPrecisionLayer",
    "QuantizedWeightLayer",
    "canonical_precision",
    "compute_dtype",
    "make_variant",
    "model_size_bytes",
    "quantize_per_channel",
    "dequantize_per_channel",
]

PRECISIONS = ("fp32", "fp16", "int8", "int4")
_ALIASES = {"bf16": "fp16", "float32": "fp32", "float16": "fp16", "bfloat16": "fp16"}
_QMAX = {8: 127, 4: 7}


def canonical_precision(precision: str) -> str:
    p = _ALIASES.get(precision.lower(), precision.lower())
    if p not in PRECISIONS:
        raise WorkloadError(f"precision {precision!r} is unknown; use one of {', '.join(PRECISIONS)} (bf16 = fp16)")
    return p


def compute_dtype(precision: str, device: str = "cpu") -> torch.dtype:
    """Dtype the UNet computes in: fp16 means bfloat16 on a CPU (CPU fp16 kernels are unusably slow)."""
    p = canonical_precision(precision)
    if p == "fp16":
        return torch.bfloat16 if torch.device(device).type == "cpu" else torch.float16
    return torch.float32


def quantize_per_channel(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization -> (packed uint8/int8 rows, float32 scales)."""
    qmax = _QMAX[bits]
    rows = w.detach().float().reshape(w.shape[0], -1)
    scale = rows.abs().amax(dim=1).clamp_min(1e-12) / qmax
    q = torch.round(rows / scale[:, None]).clamp_(-qmax, qmax).to(torch.int8)
    if bits == 8:
        return q.contiguous(), scale
    u = (q + 8).to(torch.uint8)  # 1..15 in a nibble
    if u.shape[1] % 2:
        u = torch.cat([u, torch.full((u.shape[0], 1), 8, dtype=torch.uint8)], dim=1)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous(), scale


def dequantize_per_channel(q: torch.Tensor, scale: torch.Tensor, bits: int, shape: torch.Size,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if bits == 8:
        rows = q.to(dtype)
    else:
        lo = (q & 0x0F).to(torch.int8) - 8
        hi = (q >> 4).to(torch.int8) - 8
        rows = torch.stack([lo, hi], dim=2).reshape(q.shape[0], -1)[:, : math.prod(shape[1:])].to(dtype)
    return (rows * scale[:, None].to(dtype)).reshape(shape)


class QuantizedWeightLayer(nn.Module):
    """A Conv2d or Linear whose weight is held quantized (int8 or packed int4) plus per-channel scales."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, bits: int):
        super().__init__()
        if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
            raise WorkloadError(f"Conv2d with padding_mode={layer.padding_mode!r} cannot be quantized")
        self.bits = bits
        self.kind = "conv" if isinstance(layer, nn.Conv2d) else "linear"
        self.weight_shape = tuple(layer.weight.shape)
        q, scale = quantize_per_channel(layer.weight, bits)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float().clone(), requires_grad=False)
        if self.kind == "conv":
            self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, layer.groups
        self.in_features = getattr(layer, "in_features", None)
        self.out_features = getattr(layer, "out_features", None)
        self.in_channels = getattr(layer, "in_channels", None)
        self.out_channels = getattr(layer, "out_channels", None)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_per_channel(self.qweight, self.scale, self.bits, torch.Size(self.weight_shape), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.kind == "conv":
            return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return f"{self.kind}, weight={self.weight_shape}, int{self.bits} per output channel"


class HalfPrecisionLayer(nn.Module):
    """A Conv2d or Linear computing in half precision (bf16/fp16); float32 out."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.layer = layer.to(dtype)
        self.half_dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.to(self.half_dtype)).float()


def _replace_layers(module: nn.Module, make) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, (nn.Conv2d, nn.Linear)):
            setattr(module, name, make(child))
        else:
            _replace_layers(child, make)


def make_variant(unet: nn.Module, precision: str, device: str = "cpu",
                 half_dtype: torch.dtype | None = None) -> nn.Module:
    """Turn an fp32 UNet into the variant in place (and return it). `half_dtype` chooses
    what fp16 computes in (default: `compute_dtype`; bfloat16 on a GPU is the other choice)."""
    p = canonical_precision(precision)
    unet.requires_grad_(False).eval()
    if p in ("int8", "int4"):
        bits = 8 if p == "int8" else 4
        _replace_layers(unet, lambda layer: QuantizedWeightLayer(layer, bits))
    elif p == "fp16":
        dtype = half_dtype or compute_dtype(p, device)
        if dtype not in (torch.float16, torch.bfloat16):
            raise WorkloadError(f"half_dtype {dtype} is not a half precision; use torch.float16 or torch.bfloat16")
        _replace_layers(unet, lambda layer: HalfPrecisionLayer(layer, dtype))
    return unet.to(device)


def model_size_bytes(unet: nn.Module) -> int:
    """True size: bytes of every parameter and buffer the (variant) model holds."""
    seen: set[int] = set()
    total = 0
    for t in list(unet.parameters()) + list(unet.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total
