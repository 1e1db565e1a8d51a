"""Patch parallelism for diffusers UNets: each device computes one band of rows of the latent.

Role: the math of the paper's spatial collaboration (patch-based diffusion; DistriFusion's
displaced patch parallelism, Li et al., CVPR 2024), pure torch. A `PatchUNet` is the model's
UNet with the layers that mix positions replaced, so that one call computes only its band:

- every convolution wider than 1 row (`HaloConv`) takes the rows it needs beyond its band
  (1 above and 1 below for a 3x3 conv, 1 above for a stride-2 one) from its neighbours;
- every GroupNorm (`PatchGroupNorm`) combines the per-group mean and sum of squared
  deviations of all bands (Chan's parallel formula) before normalising its own;
- every self-attention (`PatchSelfAttention`, a diffusers attention processor) attends from
  its own tokens to the keys and values of every band, made from the other bands' attention
  inputs (half the bytes of their keys and values; to_k/to_v run on the receiver).

The UNet's input is the band plus `input_halo()` rows of fresh context (1 above and 1 below for
a 3x3 conv_in); zero rows stand for the image border. What a band needs from the others goes
through an `Exchange`: `exchange(key, mine)` returns every band's contribution at that
exchange point. Synchronous (`LockstepExchange`): the contributions of the same step, so the
bands together compute exactly the unbroken UNet. Displaced (`DisplacedExchange`): the other
bands' contributions of the previous step, with this band's own fresh one — nothing waits,
quality drops a little (measured in docs/patch.md). Contributions are dicts of parts routed by
name (`receivers`): "top" goes to the band above, "bottom" to the band below, "all" to every
other band.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import functools
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from testbed.errors import WorkloadError

__all__ = [
    "PARTS",
    "Exchange",
    "PatchLayout",
    "PatchUNet",
    "LockstepExchange",
    "DisplacedExchange",
    "PatchPredictor",
    "run_synchronously",
    "run_displaced",
    "PatchRun",
    "downsample_factor",
    "valid_patch_counts",
    "receivers",
    "routed_bytes",
    "band_profile",
    "run_patch",
    "sd15_patch_profile",
]

PARTS = ("top", "bottom", "all")
Contribution = dict[str, torch.Tensor]


def receivers(part: str, sender: int, n: int) -> list[int]:
    """The bands that receive `part` of band `sender`'s contribution."""
    if part == "top":
        return [sender - 1] if sender > 0 else []
    if part == "bottom":
        return [sender + 1] if sender < n - 1 else []
    if part == "all":
        return [j for j in range(n) if j != sender]
    raise WorkloadError(f"patch contribution part {part!r}: must be one of {PARTS}")


class Exchange(Protocol):
    """Where a band gets the other bands' contributions at each exchange point."""

    def exchange(self, key: str, mine: Contribution) -> list[Contribution]:
        """Every band's contribution at `key` (this band's own is `mine`)."""
        ...


def downsample_factor(unet: nn.Module) -> int:
    """How much the UNet shrinks the latent at its deepest level (2 per downsampler)."""
    return 2 ** sum(1 for b in unet.down_blocks if getattr(b, "downsamplers", None))


def valid_patch_counts(unet: nn.Module, height: int, max_n: int) -> list[int]:
    """Band counts N >= 2 that split `height` latent rows evenly down to the deepest level."""
    f = downsample_factor(unet)
    return [n for n in range(2, max_n + 1) if height % n == 0 and (height // n) % f == 0]


@dataclass(frozen=True)
class PatchLayout:
    """N equal bands of rows of a latent `height` rows high."""

    height: int
    n: int

    def __post_init__(self) -> None:
        if self.n < 1 or self.height % self.n:
            raise WorkloadError(f"patch layout: {self.height} latent rows cannot be cut into {self.n} equal bands; "
                                "pick a band count that divides the latent height")

    @property
    def band_rows(self) -> int:
        return self.height // self.n

    def rows(self, i: int) -> tuple[int, int]:
        """Latent rows [start, end) of band i."""
        return i * self.band_rows, (i + 1) * self.band_rows

    def check(self, unet: nn.Module) -> None:
        f = downsample_factor(unet)
        if self.band_rows % f:
            raise WorkloadError(f"patch layout: bands of {self.band_rows} rows do not survive the UNet's {f}x "
                                f"downsampling; use a band count N with ({self.height} / N) % {f} == 0")

    def extend(self, x: torch.Tensor, i: int, halo: tuple[int, int]) -> torch.Tensor:
        """Band i of the full latent `x` (..., height, W) with `halo` = (above, below) rows of
        context; rows beyond the image border are zeros (the convolution's own padding)."""
        a, b = self.rows(i)
        above, below = halo
        lo, hi = max(0, a - above), min(self.height, b + below)
        zeros = x.new_zeros
        parts = [zeros((*x.shape[:-2], above - (a - lo), x.shape[-1]))] if a - lo < above else []
        parts.append(x[..., lo:hi, :])
        if hi - b < below:
            parts.append(zeros((*x.shape[:-2], below - (hi - b), x.shape[-1])))
        return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]


# -- the band being computed on this thread --------------------------------------------------

@dataclass
class _Band:
    index: int
    layout: PatchLayout
    exchange: Exchange


_current = threading.local()


def _band() -> _Band:
    band = getattr(_current, "band", None)
    if band is None:
        raise WorkloadError("a patch layer ran outside PatchUNet.forward (no band is being computed)")
    return band


@contextlib.contextmanager
def _computing(band: _Band) -> Iterator[None]:
    _current.band = band
    try:
        yield
    finally:
        _current.band = None


def _inner_conv(m: nn.Module) -> nn.Module:
    """The module holding a conv's geometry: the conv itself, or the one inside a
    HalfPrecisionLayer (diffusion/quantize.py); QuantizedWeightLayer holds its own."""
    inner = getattr(m, "layer", None)
    return inner if isinstance(inner, nn.Conv2d) else m


def _conv_geometry(m: nn.Module) -> tuple[int, int, int] | None:
    """(kernel rows, stride rows, padding rows) of a conv-like module, None for anything else."""
    conv = _inner_conv(m)
    if isinstance(conv, nn.Conv2d):
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or conv.dilation[0] != 1:
            raise WorkloadError(f"patch UNet: conv with padding {conv.padding!r}, padding_mode "
                                f"{conv.padding_mode!r}, dilation {conv.dilation} is not supported")
        return conv.kernel_size[0], conv.stride[0], conv.padding[0]
    if getattr(conv, "kind", None) == "conv":  # QuantizedWeightLayer
        return conv.weight_shape[2], conv.stride[0], conv.padding[0]
    return None


def _rows_only_padding(m: nn.Module) -> None:
    """Drop the conv's row padding (its halo rows take that place); keep the column padding."""
    conv = _inner_conv(m)
    conv.padding = (0, conv.padding[1])


class HaloConv(nn.Module):
    """A convolution over a band: the rows beyond the band come from the neighbours."""

    def __init__(self, conv: nn.Module, key: str, geometry: tuple[int, int, int]):
        super().__init__()
        self.key = key
        k, self.stride, self.above = geometry
        self.below = k - self.above - self.stride  # rows needed below the band
        if self.below < 0:
            raise WorkloadError(f"patch UNet: {key} (kernel {k}, stride {self.stride}, padding {self.above}) "
                                "is not supported")
        _rows_only_padding(conv)
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        band = _band()
        i, n = band.index, band.layout.n
        r = x.shape[-2]
        if r % self.stride or r < max(self.above, self.below):
            raise WorkloadError(f"patch UNet: {self.key} gets a band of {r} rows; use fewer bands")
        mine = {"top": x[..., : self.below, :], "bottom": x[..., r - self.above:, :]}
        got = band.exchange.exchange(self.key, mine)
        above = got[i - 1]["bottom"] if i > 0 else x.new_zeros((*x.shape[:-2], self.above, x.shape[-1]))
        below = got[i + 1]["top"] if i < n - 1 else x.new_zeros((*x.shape[:-2], self.below, x.shape[-1]))
        return self.conv(torch.cat([above.to(x.dtype), x, below.to(x.dtype)], dim=-2))


class InputConv(nn.Module):
    """conv_in: its input already carries the halo rows (`input_halo`), so no exchange."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        _rows_only_padding(conv)
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PatchGroupNorm(nn.Module):
    """GroupNorm with statistics over every band: each band gives its (mean, M2) per group
    (equal bands: equal counts), combined with Chan's parallel formula."""

    def __init__(self, norm: nn.GroupNorm, key: str):
        super().__init__()
        self.key = key
        self.groups, self.eps = norm.num_groups, norm.eps
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        band = _band()
        b, c = x.shape[:2]
        xg = x.float().reshape(b, self.groups, -1)
        count = xg.shape[-1]
        var, mean = torch.var_mean(xg, dim=-1, correction=0)
        got = band.exchange.exchange(self.key, {"all": torch.stack([mean, var * count], dim=-1)})
        stats = torch.stack([s["all"].float() for s in got])  # (N, B, G, 2)
        means, m2s = stats[..., 0], stats[..., 1]
        g_mean = means.mean(dim=0)
        g_var = (m2s.sum(dim=0) + count * (means - g_mean).square().sum(dim=0)) / (count * len(got))
        # y = x * scale + shift per (sample, channel): one pass over the band
        scale = torch.rsqrt(g_var + self.eps).repeat_interleave(c // self.groups, dim=1)
        shift = -g_mean.repeat_interleave(c // self.groups, dim=1) * scale
        if self.weight is not None:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        y = torch.addcmul(shift[..., None], x.float().reshape(b, c, -1), scale[..., None])
        return y.reshape(x.shape).to(x.dtype)


class PatchSelfAttention:
    """diffusers' AttnProcessor2_0 for self-attention over every band's tokens: the other
    bands send their attention input (after the attention's own norm), this band projects it
    to keys and values. Row bands flatten to consecutive token runs, so concatenating the
    bands in order gives the unbroken sequence."""

    def __init__(self, key: str):
        self.key = key

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise WorkloadError(f"patch UNet: {self.key} is a self-attention called with context or a mask")
        band = _band()
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        got = band.exchange.exchange(self.key, {"all": hidden_states})
        every = torch.cat([g["all"].to(hidden_states.dtype) for g in got], dim=1)
        key, value = attn.to_k(every), attn.to_v(every)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _check_supported(unet: nn.Module) -> None:
    for name, m in unet.named_modules():
        kind = type(m).__name__
        if isinstance(m, nn.ConvTranspose2d) or getattr(m, "use_conv_transpose", False):
            raise WorkloadError(f"patch UNet: {name} ({kind}) upsamples with a transposed conv; not supported")
        if kind == "Downsample2D" and m.use_conv and m.padding == 0:
            raise WorkloadError(f"patch UNet: {name} pads asymmetrically (downsample_padding=0); not supported")
        if kind in ("FirUpsample2D", "FirDownsample2D", "KDownsample2D", "KUpsample2D", "SpatialNorm"):
            raise WorkloadError(f"patch UNet: {name} ({kind}) is not supported")


class PatchUNet:
    """A UNet that computes one band (see the module docstring). `copy=False` patches
    `unet` in place (an agent's own model); by default a deep copy is patched."""

    def __init__(self, unet: nn.Module, copy_unet: bool = True):
        self.unet = copy.deepcopy(unet) if copy_unet else unet
        _check_supported(self.unet)
        self.points: list[str] = []  # exchange points, in the order of the modules
        self.halo = (0, 0)
        replaced: list[str] = []
        for name, m in list(self.unet.named_modules()):
            if not name or any(name.startswith(r + ".") for r in replaced):
                continue  # the conv inside a HalfPrecisionLayer that was just wrapped
            parent_name, _, child = name.rpartition(".")
            parent = self.unet.get_submodule(parent_name) if parent_name else self.unet
            geometry = _conv_geometry(m)
            if geometry is not None:
                replaced.append(name)
            if name == "conv_in" and geometry is not None:
                k, s, p = geometry
                self.halo = (p, k - p - s)
                setattr(parent, child, InputConv(m))
            elif geometry is not None and geometry[0] > 1:
                setattr(parent, child, HaloConv(m, name, geometry))
                self.points.append(name)
            elif isinstance(m, nn.GroupNorm):
                setattr(parent, child, PatchGroupNorm(m, name))
                self.points.append(name)
            elif type(m).__name__ == "Attention" and not m.is_cross_attention:
                m.set_processor(PatchSelfAttention(name))
                self.points.append(name)

    @property
    def input_halo(self) -> tuple[int, int]:
        """(rows above, rows below) of context the UNet input carries around its band."""
        return self.halo

    def forward(self, x_ext: torch.Tensor, t: Any, unet_kwargs: dict[str, torch.Tensor], index: int,
                layout: PatchLayout, exchange: Exchange) -> torch.Tensor:
        """The UNet's output on band `index` of `layout`; `x_ext` is the band with its input halo."""
        if not 0 <= index < layout.n:
            raise WorkloadError(f"patch index {index} is outside the layout's {layout.n} bands")
        with _computing(_Band(index, layout, exchange)), torch.inference_mode():
            return self.unet(x_ext, t, **unet_kwargs).sample


# -- exchanges -------------------------------------------------------------------------------

class LockstepExchange:
    """Synchronous exchange among N bands computed on N threads: each exchange point waits
    until every band has given its contribution. Keeps every contribution (`by_key`), which
    the next step's displaced exchange reuses."""

    def __init__(self, n: int, timeout_s: float = 600.0):
        self.n, self.timeout_s = n, timeout_s
        self.by_key: dict[str, list[Contribution | None]] = {}
        self._cond = threading.Condition()
        self._failed: BaseException | None = None

    def view(self, index: int) -> Exchange:
        return _LockstepView(self, index)

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self._failed = error
            self._cond.notify_all()

    def put_and_wait(self, index: int, key: str, mine: Contribution) -> list[Contribution]:
        with self._cond:
            slots = self.by_key.setdefault(key, [None] * self.n)
            slots[index] = mine
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: self._failed is not None or all(s is not None for s in slots),
                                       timeout=self.timeout_s):
                raise WorkloadError(f"patch exchange {key}: bands {[j for j, s in enumerate(slots) if s is None]} "
                                    f"gave nothing within {self.timeout_s:g} s")
            if self._failed is not None:
                raise WorkloadError(f"patch exchange {key}: another band failed ({self._failed})")
            return list(slots)  # type: ignore[arg-type]


@dataclass
class _LockstepView:
    group: LockstepExchange
    index: int

    def exchange(self, key: str, mine: Contribution) -> list[Contribution]:
        return self.group.put_and_wait(self.index, key, mine)


@dataclass
class DisplacedExchange:
    """The other bands' contributions of the previous step (`stale[key][j]`), this band's
    own fresh one; what this band gives is kept in `fresh` for the next step."""

    index: int
    stale: dict[str, list[Contribution]]
    fresh: dict[str, Contribution] = field(default_factory=dict)

    def exchange(self, key: str, mine: Contribution) -> list[Contribution]:
        self.fresh[key] = mine
        old = self.stale.get(key)
        if old is None:
            raise WorkloadError(f"displaced patch step: no previous-step context for {key}; run a synchronous "
                                "warm-up step first")
        return [mine if j == self.index else old[j] for j in range(len(old))]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * (4 if t.dtype == torch.bfloat16 else t.element_size())  # bf16 crosses as float32


def routed_bytes(by_key: dict[str, list[Contribution]], n: int,
                 dtype_bytes: int | None = None) -> tuple[list[int], list[int]]:
    """(bytes each band sends, bytes each band receives) at these exchange points: a part
    goes up once when some band needs it and comes down to each band that needs it.
    `dtype_bytes` counts every element at that width (e.g. 2 for fp16 activations)."""
    up, down = [0] * n, [0] * n
    for contribs in by_key.values():
        for j, contrib in enumerate(contribs):
            for part, t in contrib.items():
                size = t.numel() * dtype_bytes if dtype_bytes is not None else _nbytes(t)
                to = receivers(part, j, n)
                if to:
                    up[j] += size
                for r in to:
                    down[r] += size
    return up, down


# -- a whole generation, in this process -----------------------------------------------------

@dataclass
class PatchRun:
    """What `run_patch` did: bytes each band sent and received at every step, the modes."""

    n: int
    halo: tuple[int, int]
    modes: list[str] = field(default_factory=list)  # "sync" | "displaced", per step
    up_bytes: list[list[int]] = field(default_factory=list)
    down_bytes: list[list[int]] = field(default_factory=list)
    points: int = 0


def run_synchronously(punet: PatchUNet, x: torch.Tensor, t: Any, kw: dict[str, torch.Tensor],
                      layout: PatchLayout) -> tuple[list[torch.Tensor], dict[str, list[Contribution]]]:
    """Every band of the full input `x` on its own thread, in lockstep: (the bands' outputs,
    every band's contribution at every exchange point)."""
    group = LockstepExchange(layout.n)
    bands = [layout.extend(x, i, punet.input_halo) for i in range(layout.n)]
    with concurrent.futures.ThreadPoolExecutor(layout.n, thread_name_prefix="patch") as pool:
        futs = [pool.submit(punet.forward, bands[i], t, kw, i, layout, group.view(i)) for i in range(layout.n)]
        for f in concurrent.futures.as_completed(futs):
            if f.exception() is not None:
                group.fail(f.exception())  # type: ignore[arg-type]
        outs = [f.result() for f in futs]
    return outs, {k: list(v) for k, v in group.by_key.items()}  # type: ignore[misc]


def run_displaced(punet: PatchUNet, x: torch.Tensor, t: Any, kw: dict[str, torch.Tensor], layout: PatchLayout,
                  stale: dict[str, list[Contribution]]) -> tuple[list[torch.Tensor], dict[str, list[Contribution]]]:
    """Every band of `x` with the other bands' `stale` context, one after the other (nothing
    waits): (the bands' outputs, their fresh contributions)."""
    views = [DisplacedExchange(i, stale) for i in range(layout.n)]
    outs = [punet.forward(layout.extend(x, i, punet.input_halo), t, kw, i, layout, views[i]) for i in range(layout.n)]
    return outs, {k: [v.fresh[k] for v in views] for k in views[0].fresh}


class PatchPredictor:
    """`predict(x_in, t, kw)` for `run_stage` that computes the UNet band by band: the first
    `warmup_steps` calls synchronously (N threads in lockstep), the rest displaced."""

    def __init__(self, unet: nn.Module, layout: PatchLayout, warmup_steps: int):
        self.punet = PatchUNet(unet)
        layout.check(self.punet.unet)
        self.layout, self.warmup_steps = layout, warmup_steps
        self.record = PatchRun(n=layout.n, halo=self.punet.input_halo, points=len(self.punet.points))
        self.stale: dict[str, list[Contribution]] = {}

    def __call__(self, x_in: torch.Tensor, t: Any, kw: dict[str, torch.Tensor]) -> torch.Tensor:
        sync = len(self.record.modes) < self.warmup_steps
        if sync:
            outs, fresh = run_synchronously(self.punet, x_in, t, kw, self.layout)
        else:
            outs, fresh = run_displaced(self.punet, x_in, t, kw, self.layout, self.stale)
        self.stale = fresh
        up, down = routed_bytes(fresh, self.layout.n)
        self.record.modes.append("sync" if sync else "displaced")
        self.record.up_bytes.append(up)
        self.record.down_bytes.append(down)
        return torch.cat(outs, dim=-2)


def run_patch(model: Any, latent: torch.Tensor, cond: dict[str, torch.Tensor], total_steps: int, n: int,
              warmup_steps: int = 1, scheduler_kind: str = "ddim",
              guidance_scale: float | None = None) -> tuple[torch.Tensor, PatchRun]:
    """A whole generation with the UNet cut into `n` row bands (`warmup_steps` synchronous
    steps, then displaced ones); `warmup_steps >= total_steps` is fully synchronous, which
    equals the unbroken run to float tolerance."""
    from testbed.diffusion.stages import run_stage

    predict = PatchPredictor(model.unet, PatchLayout(model.latent_shape[1], n), warmup_steps)
    x, _ = run_stage(model, latent, cond, 0, total_steps, total_steps, scheduler_kind,
                     guidance_scale=guidance_scale, predict=predict)
    return x, predict.record


# -- what the bands exchange and compute, from the shapes ------------------------------------

def band_profile(unet: nn.Module, full: torch.Tensor, t: Any, unet_kwargs: dict[str, torch.Tensor], n: int,
                 dtype_bytes: int | None = None, count_flops: bool = False) -> dict[str, Any]:
    """Per band of `full` cut into `n`: the context bytes it sends and receives per step
    (at `dtype_bytes` per element, default the tensors' own, bf16 as float32), its share of
    the UNet's FLOPs with `count_flops` (torch's FlopCounterMode; the keys and values it
    projects from the other bands' attention inputs included) and the exchange points.
    Works on the meta device (shapes only): every band's contribution stands in for the
    others' (equal bands have equal shapes). The UNet is patched in place."""
    from torch.utils.flop_counter import FlopCounterMode

    total_flops = None
    if count_flops:
        with torch.inference_mode(), FlopCounterMode(display=False) as fc:
            unet(full, t, **unet_kwargs)
        total_flops = fc.get_total_flops()
    punet = PatchUNet(unet, copy_unet=False)
    layout = PatchLayout(full.shape[-2], n)
    layout.check(punet.unet)
    up, down, shares = [0] * n, [0] * n, []
    for i in range(n):
        mirror = _MirrorExchange(n)
        x = layout.extend(full, i, punet.input_halo)
        with FlopCounterMode(display=False) if count_flops else contextlib.nullcontext() as fc:
            punet.forward(x, t, unet_kwargs, i, layout, mirror)
        if count_flops:
            shares.append(fc.get_total_flops() / total_flops)
        u, d = routed_bytes({k: [v] * n for k, v in mirror.by_key.items()}, n, dtype_bytes)
        up[i], down[i] = u[i], d[i]
    return {"n": n, "up_bytes": up, "down_bytes": down, "flop_share": shares, "points": len(punet.points),
            "halo": list(punet.input_halo)}


@functools.lru_cache(maxsize=32)
def sd15_patch_profile(resolution_px: int, n: int, dtype_bytes: int = 4, cfg_batch: int = 2) -> dict[str, Any]:
    """`band_profile` of SD1.5 at `resolution_px` with `n` bands (meta device, seconds)."""
    from diffusers import UNet2DConditionModel

    from testbed.diffusion.split import SD15_TEXT_TOKENS, SD15_UNET_CONFIG, SD15_VAE_SCALE_FACTOR

    side = resolution_px // SD15_VAE_SCALE_FACTOR
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        ehs = torch.empty(cfg_batch, SD15_TEXT_TOKENS, SD15_UNET_CONFIG["cross_attention_dim"])
        full = torch.empty(cfg_batch, SD15_UNET_CONFIG["in_channels"], side, side)
    prof = band_profile(unet, full, torch.tensor(999, device="meta"), {"encoder_hidden_states": ehs}, n,
                        dtype_bytes, count_flops=True)
    return prof | {"resolution_px": resolution_px, "dtype_bytes": dtype_bytes}


@dataclass
class _MirrorExchange:
    """Shapes only: every other band gives what this band gives."""

    n: int
    by_key: dict[str, Contribution] = field(default_factory=dict)

    def exchange(self, key: str, mine: Contribution) -> list[Contribution]:
        self.by_key[key] = mine
        return [mine] * self.n

