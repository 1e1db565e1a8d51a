"""Training images of the tiny model, made on the spot: coloured digit glyphs, no download.

Role: the data set, and the reading of generated images (colours, a digit classifier) that
tests and the model card's figures use. Each digit is rendered once by Pillow in the font Pillow itself ships (so
every machine with the same Pillow renders the same pixels), in four stroke widths; each sample
warps one of them with a random affine map (size, rotation, shear, aspect, shift) and a smooth
random elastic field, supersampled 2x and area-averaged to 32 x 32, then paints it in the ink
colour on the background colour. The glyph stays >= 3 px away from the border (checked by the
tests), so the border is background.
"""

from __future__ import annotations

import functools
import random

import numpy as np
import torch
import torch.nn.functional as F

from testbed.model.prompts import COLOURS, parse_colour_prompt, sample_training_prompt

__all__ = [
    "GLYPH_IMAGE_PX",
    "PALETTE_RGB",
    "fit_digit_classifier",
    "glyph_features",
    "nearest_colour",
    "read_image",
    "render_glyphs",
    "render_prompts",
    "training_batch",
]

GLYPH_IMAGE_PX = 32
PALETTE_RGB: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0), "white": (255, 255, 255), "red": (220, 30, 30),
    "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 210, 30),
}
assert tuple(PALETTE_RGB) == COLOURS
_CANVAS_PX = 96
_FONT_PX = 72
_STROKES = (0, 1, 2, 3)  # extra stroke width in canvas pixels (about 0, 1/3, 2/3, 1 output px)


@functools.lru_cache(maxsize=1)
def _base_glyphs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(10, strokes, 96, 96) masks in [0, 1] and each glyph's box centre (x, y) and height, in
    grid_sample's normalised coordinates."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=_FONT_PX)  # Pillow's own scalable font: the same everywhere
    masks = torch.zeros(10, len(_STROKES), _CANVAS_PX, _CANVAS_PX)
    for d in range(10):
        for j, sw in enumerate(_STROKES):
            im = Image.new("L", (_CANVAS_PX, _CANVAS_PX), 0)
            ImageDraw.Draw(im).text((_CANVAS_PX / 2, _CANVAS_PX / 2), str(d), fill=255, font=font, anchor="mm",
                                    stroke_width=sw, stroke_fill=255)
            masks[d, j] = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(_CANVAS_PX, _CANVAS_PX) / 255.0
    rows, cols = masks.amax(dim=3) > 0, masks.amax(dim=2) > 0
    ar = torch.arange(_CANVAS_PX, dtype=torch.float32)

    def span(on: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo = torch.where(on, ar, float(_CANVAS_PX)).amin(-1)
        hi = torch.where(on, ar, -1.0).amax(-1) + 1
        return lo, hi

    top, bottom = span(rows)
    left, right = span(cols)
    to_norm = 2.0 / _CANVAS_PX
    return masks, (left + right) / 2 * to_norm - 1, (top + bottom) / 2 * to_norm - 1, (bottom - top) * to_norm


def render_glyphs(digits: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """(N,) digits -> (N, 1, 32, 32) ink masks in [0, 1], each randomly distorted (generator `g`)."""
    masks, cx, cy, gh = _base_glyphs()
    n = len(digits)
    stroke = torch.randint(0, len(_STROKES), (n,), generator=g)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g)

    height_px, rot, shear, aspect = uniform(15, 20), uniform(-0.2, 0.2), uniform(-0.25, 0.25), uniform(0.85, 1.15)
    shift_x, shift_y = uniform(-1.5, 1.5), uniform(-1.5, 1.5)
    half = GLYPH_IMAGE_PX / 2
    k = gh[digits, stroke] * half / height_px  # canvas units per output unit
    c, s = torch.cos(rot), torch.sin(rot)
    theta = torch.zeros(n, 2, 3)  # canvas point = theta @ output point: scale, rotate, shear, shift
    theta[:, 0, 0], theta[:, 0, 1] = k / aspect * c, k * (shear * c - s)
    theta[:, 1, 0], theta[:, 1, 1] = k / aspect * s, k * (c + shear * s)
    theta[:, 0, 2] = cx[digits, stroke] + shift_x / half * k
    theta[:, 1, 2] = cy[digits, stroke] + shift_y / half * k
    side = 2 * GLYPH_IMAGE_PX  # supersampled, then area-averaged: anti-aliased edges
    grid = F.affine_grid(theta, [n, 1, side, side], align_corners=False)
    # elastic: a random 4 x 4 displacement field (up to ~1 output px), smoothly interpolated
    amp = uniform(0.0, 1.0)[:, None, None, None] / half
    field = torch.randn(n, 2, 4, 4, generator=g) * amp
    field = F.interpolate(field, size=(side, side), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    warped = F.grid_sample(masks[digits, stroke][:, None], grid + field * k[:, None, None, None], mode="bilinear",
                           padding_mode="zeros", align_corners=False)
    return F.avg_pool2d(warped, 2).clamp(0.0, 1.0)


def _palette() -> torch.Tensor:
    return torch.tensor(list(PALETTE_RGB.values()), dtype=torch.float32) / 127.5 - 1.0


def render_prompts(prompts: list[str], g: torch.Generator) -> torch.Tensor:
    """Images of what the prompts ask for: (N, 3, 32, 32) in [-1, 1]."""
    parsed = [parse_colour_prompt(p) for p in prompts]
    pal = _palette()
    ink = pal[[COLOURS.index(p.ink) for p in parsed]][:, :, None, None]
    bg = pal[[COLOURS.index(p.background) for p in parsed]][:, :, None, None]
    mask = render_glyphs(torch.tensor([p.digit for p in parsed]), g)
    return bg + (ink - bg) * mask


def training_batch(n: int, g: torch.Generator, rng: random.Random) -> tuple[list[str], torch.Tensor]:
    """`n` random prompts of the grammar and their images."""
    prompts = [sample_training_prompt(rng) for _ in range(n)]
    return prompts, render_prompts(prompts, g)


def nearest_colour(rgb) -> str:
    """The palette colour nearest (Euclidean, 0..255) to an RGB triple."""
    r = torch.as_tensor(rgb, dtype=torch.float32).reshape(3)
    pal = torch.tensor(list(PALETTE_RGB.values()), dtype=torch.float32)
    return COLOURS[int(((pal - r) ** 2).sum(1).argmin())]


def read_image(image) -> tuple[str, str, np.ndarray]:
    """What a generated (H, W, 3) uint8 image shows: its background colour (median of the 2-px
    border), its ink colour (median of the pixels farthest from the background) as palette names,
    and the glyph mask (H, W) in [0, 1] (distance from the background, scaled to its 98th percentile)."""
    a = np.asarray(image, dtype=np.float32)
    ring = np.ones(a.shape[:2], dtype=bool)
    ring[2:-2, 2:-2] = False
    bg = np.median(a[ring], axis=0)
    dist = np.sqrt(((a - bg) ** 2).sum(-1))
    mask = np.clip(dist / max(float(np.percentile(dist, 98)), 1.0), 0.0, 1.0)
    ink = np.median(a[mask > 0.6], axis=0) if (mask > 0.6).any() else bg
    return nearest_colour(bg), nearest_colour(ink), mask


def glyph_features(images) -> np.ndarray:
    """(N, 32, 32, 3) uint8 images -> (N, 256) features: each glyph mask area-averaged to 16 x 16."""
    masks = np.stack([read_image(im)[2] for im in images])
    return masks.reshape(len(masks), 16, 2, 16, 2).mean(axis=(2, 4)).reshape(len(masks), -1)


def fit_digit_classifier(n: int = 3000, seed: int = 1234):
    """An SVM that names the digit of an image, trained on `n` freshly rendered random prompts."""
    from sklearn.svm import SVC

    g, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    prompts, images = training_batch(n, g, rng)
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return SVC(C=10.0).fit(glyph_features(pixels), [parse_colour_prompt(p).digit for p in prompts])
