"""Training images of the tiny model, made on the spot: coloured digit glyphs, no download.

Role: the data set, and the reading of generated images (their colours and glyph mask) that the
judge, the tests and the model card's figures use. Each digit is rendered once per typeface
(`fonts.TRAINING_FACES`: 38 faces of nine designs from Debian font packages) by
Pillow, in four stroke widths; each sample picks a face and a stroke at random and warps the glyph
with a random affine map (size, rotation, shear, aspect, shift) and a smooth random elastic field,
supersampled 2x and area-averaged to 32 x 32, then paints it in the ink colour on the background
colour. The glyph stays >= 3 px away from the border (checked by the tests), so the border is
background. `render_glyphs(..., faces=JUDGE_FACES)` draws the judge's held-out faces the same way.
"""

from __future__ import annotations

import functools
import random

import numpy as np
import torch
import torch.nn.functional as F

from testbed.diffusion.fonts import TRAINING_FACES, Face, font_file
from testbed.model.prompts import COLOURS, parse_colour_prompt, sample_training_prompt

__all__ = [
    "GLYPH_IMAGE_PX",
    "PALETTE_RGB",
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
_FONT_PX = 64  # a digit is ~45 px tall: room on the canvas for wide faces, italics and the widest stroke
_MARGIN_PX = 3  # the glyph keeps this far from the border: the border is background
_STROKES = (0, 1, 2, 3)  # extra stroke width in canvas pixels (about 0, 0.4, 0.8, 1.2 output px)
# the heaviest ink an 8 may have (its area / its height squared): bold faces with the widest
# strokes closed the counters of 3, 6, 8 and 9 into blobs a reader takes for an 8
_MAX_WEIGHT = 0.52


def _render_face(face: Face) -> torch.Tensor:
    """(10, strokes, 96, 96) uint8 masks of one face."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(font_file(face)), _FONT_PX)
    masks = torch.zeros(10, len(_STROKES), _CANVAS_PX, _CANVAS_PX, dtype=torch.uint8)
    for d in range(10):
        for j, sw in enumerate(_STROKES):
            im = Image.new("L", (_CANVAS_PX, _CANVAS_PX), 0)
            ImageDraw.Draw(im).text((_CANVAS_PX / 2, _CANVAS_PX / 2), str(d), fill=255, font=font, anchor="mm",
                                    stroke_width=sw, stroke_fill=255)
            masks[d, j] = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(_CANVAS_PX, _CANVAS_PX)
    return masks


@functools.lru_cache(maxsize=2)
def _base_glyphs(faces: tuple[Face, ...]) -> tuple[torch.Tensor, ...]:
    """(faces, 10, strokes, 96, 96) uint8 masks; each glyph's box centre (x, y) and height, in
    grid_sample's normalised coordinates ((faces, 10, strokes) each); the strokes each face may
    take ((faces, strokes) bool: at least the thinnest)."""
    masks = torch.stack([_render_face(f) for f in faces])
    top, bottom = _span(masks.amax(dim=4) > 0)
    left, right = _span(masks.amax(dim=3) > 0)
    to_norm = 2.0 / _CANVAS_PX
    weight = masks[:, 8].float().sum((-1, -2)) / 255.0 / (bottom - top)[:, 8] ** 2
    allowed = (weight <= _MAX_WEIGHT) | (torch.arange(len(_STROKES)) == 0)
    return (masks, (left + right) / 2 * to_norm - 1, (top + bottom) / 2 * to_norm - 1, (bottom - top) * to_norm,
            allowed)


def render_glyphs(digits: torch.Tensor, g: torch.Generator, faces: tuple[Face, ...] = TRAINING_FACES) -> torch.Tensor:
    """(N,) digits -> (N, 1, 32, 32) ink masks in [0, 1], each in a random face and stroke of
    `faces`, randomly distorted (generator `g`)."""
    masks, cx, cy, gh, allowed = _base_glyphs(faces)
    n = len(digits)
    face = torch.randint(0, len(faces), (n,), generator=g)
    # a stroke among those the face may take (they are the thinnest ones: a prefix of _STROKES)
    stroke = (torch.rand(n, generator=g) * allowed[face].sum(1)).long()

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g)

    height_px, rot, shear, aspect = uniform(15, 20), uniform(-0.2, 0.2), uniform(-0.25, 0.25), uniform(0.85, 1.15)
    shift_x, shift_y = uniform(-1.5, 1.5), uniform(-1.5, 1.5)
    half = GLYPH_IMAGE_PX / 2
    k = gh[face, digits, stroke] * half / height_px  # canvas units per output unit
    c, s = torch.cos(rot), torch.sin(rot)
    theta = torch.zeros(n, 2, 3)  # canvas point = theta @ output point: scale, rotate, shear, shift
    theta[:, 0, 0], theta[:, 0, 1] = k / aspect * c, k * (shear * c - s)
    theta[:, 1, 0], theta[:, 1, 1] = k / aspect * s, k * (c + shear * s)
    theta[:, 0, 2] = cx[face, digits, stroke] + shift_x / half * k
    theta[:, 1, 2] = cy[face, digits, stroke] + shift_y / half * k
    side = 2 * GLYPH_IMAGE_PX  # supersampled, then area-averaged: anti-aliased edges
    # elastic: a random 4 x 4 displacement field (up to ~1 output px), smoothly interpolated
    amp = uniform(0.0, 1.0)[:, None, None, None] / half
    field = torch.randn(n, 2, 4, 4, generator=g) * amp
    field = F.interpolate(field, size=(side, side), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    field = field * k[:, None, None, None]
    base = masks[face, digits, stroke][:, None].float() / 255.0

    def warp(theta: torch.Tensor) -> torch.Tensor:
        grid = F.affine_grid(theta, [n, 1, side, side], align_corners=False) + field
        return F.grid_sample(base, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    warped = warp(_inside_border(warp(theta), theta, _MARGIN_PX * 2 + 1))
    return F.avg_pool2d(warped, 2).clamp(0.0, 1.0)


def _inside_border(warped: torch.Tensor, theta: torch.Tensor, margin: int) -> torch.Tensor:
    """The affine maps moved (and, for a glyph wider than the free box, shrunk) so that each warped
    glyph keeps `margin` supersampled pixels from the border; glyphs already inside stay as they are.
    (Wide italics, sheared further, reach the border otherwise.)"""
    side = warped.shape[-1]
    top, bottom = _span((warped[:, 0] > 0).any(2))
    left, right = _span((warped[:, 0] > 0).any(1))
    room, mid = side - 2 * margin, side / 2
    scale = torch.clamp(torch.minimum(room / (bottom - top), room / (right - left)), max=1.0)

    def shift(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:  # pixels to move, after scaling
        lo, hi = mid + (lo - mid) * scale, mid + (hi - mid) * scale
        return (margin - lo).clamp(min=0) - (hi - (side - margin)).clamp(min=0)

    d = torch.stack([shift(left, right), shift(top, bottom)], dim=1) * (2 / side)  # normalised units
    lin = theta[:, :, :2] / scale[:, None, None]  # output point o' = scale * o + d  ->  o = (o' - d) / scale
    return torch.cat([lin, theta[:, :, 2:] - lin @ d[:, :, None]], dim=2)


def _span(on: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and one-past-last index where `on` (.., size) is true, as floats; (0, size) where it
    never is."""
    size = on.shape[-1]
    ar = torch.arange(size, dtype=torch.float32)
    lo = torch.where(on, ar, float(size)).amin(-1)
    hi = torch.where(on, ar, -1.0).amax(-1) + 1
    some = on.any(-1)
    return torch.where(some, lo, 0.0), torch.where(some, hi, float(size))


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
