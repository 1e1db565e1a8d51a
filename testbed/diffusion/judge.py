"""The judge: which digit, ink and background a generated image shows, read by a classifier that
never saw the tiny model's training data.

Role: the prompt-fidelity figures of the model card, the tests and the bench. The digit
classifier is a small CNN trained on other typefaces (`fonts.JUDGE_FACES`, drawn with the same
distortions as the training data) and on handwriting (the UCI 8 x 8 digits that scikit-learn
ships; a third of them held out to measure it). Every image, rendered or generated, is read the
same way: its glyph mask (`glyphs.read_image`) is cut to the glyph's box and scaled to 16 px high
(aspect kept), centred on 16 x 16 -- the normalisation of the UCI digits, whose 8 x 8 images are
scaled up to match; half the rendered glyphs pass through 8 x 8 as well, so resolution tells
the classifier nothing about the source. `train_judge` is deterministic for a seed; its weights
(testbed/data/digit_judge.safetensors, 0.8 MB) are committed, `testbed train-tiny --model judge`
makes them again.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from testbed.diffusion.training import TrainingLoop, deterministic_cpu
from testbed.errors import WorkloadError

__all__ = [
    "JUDGE_INPUT_PX",
    "JUDGE_WEIGHTS_PATH",
    "DigitJudge",
    "Reading",
    "glyph_boxes",
    "fidelity_prompts",
    "judge_images",
    "load_judge",
    "reads_as_prompted",
    "train_judge",
    "uci_digits",
]

JUDGE_INPUT_PX = 16
JUDGE_WEIGHTS_PATH = Path(__file__).resolve().parent.parent / "data" / "digit_judge.safetensors"
_UCI_TEST_EVERY = 3  # every third UCI digit is held out of the judge's training, to measure it
_BOX_THRESHOLD = 0.35  # mask value above which a pixel belongs to the glyph's box


class DigitJudge(nn.Module):
    """(B, 1, 16, 16) boxed glyphs -> (B, 10) logits: two conv blocks and a small classifier."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(2 * w * 16, 128), nn.ReLU(),
                                  nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass(frozen=True)
class Reading:
    """What the judge sees in one image: the digit (and its softmax probability) and the colours."""

    digit: int
    confidence: float
    ink: str
    background: str


def glyph_boxes(masks: np.ndarray, via_8px: np.ndarray | None = None) -> torch.Tensor:
    """(N, H, W) glyph masks in [0, 1] -> (N, 1, 16, 16): each cut to its glyph's box, scaled to
    16 px high (aspect kept, at most 16 wide) and centred; where `via_8px` is true, the box is
    first reduced to 8 x 8 (UCI's resolution) and scaled back up. An empty mask stays empty."""
    side = JUDGE_INPUT_PX
    out = torch.zeros(len(masks), 1, side, side)
    for i, m in enumerate(np.asarray(masks, dtype=np.float32)):
        on = m > _BOX_THRESHOLD
        if not on.any():
            continue
        rows, cols = np.flatnonzero(on.any(1)), np.flatnonzero(on.any(0))
        crop = torch.from_numpy(np.ascontiguousarray(m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]))[None, None]
        h, w = crop.shape[-2:]
        width = int(max(1, min(side, round(w * side / h))))
        box = torch.zeros(1, 1, side, side)
        left = (side - width) // 2
        box[..., left:left + width] = F.interpolate(crop, size=(side, width), mode="bilinear", align_corners=False)
        if via_8px is not None and via_8px[i]:
            box = F.interpolate(F.avg_pool2d(box, 2), size=(side, side), mode="bilinear", align_corners=False)
        out[i] = box[0]
    return out.clamp(0.0, 1.0)


def uci_digits(held_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's UCI handwritten digits as judge inputs (N, 1, 16, 16) and labels: every
    third one (held_out=True) or the others. Their 8 x 8 images are already boxed the same way
    (full height, aspect kept, centred): only scaled up."""
    from sklearn.datasets import load_digits

    d = load_digits()
    pick = (np.arange(len(d.target)) % _UCI_TEST_EVERY == 0) == held_out
    x = torch.tensor(d.images[pick], dtype=torch.float32)[:, None] / 16.0
    side = JUDGE_INPUT_PX
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False), torch.tensor(d.target[pick])


def _rendered(n: int, g: torch.Generator, faces) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` glyphs of `faces` as the judge reads generated images: painted in a random palette pair,
    read back through `read_image`, boxed (half of them via 8 x 8)."""
    from testbed.diffusion.glyphs import PALETTE_RGB, read_image, render_glyphs

    digits = torch.randint(0, 10, (n,), generator=g)
    masks = render_glyphs(digits, g, faces)[:, 0]
    pal = torch.tensor(list(PALETTE_RGB.values()), dtype=torch.float32)
    ink = torch.randint(0, len(pal), (n,), generator=g)
    bg = (ink + torch.randint(1, len(pal), (n,), generator=g)) % len(pal)
    images = pal[bg][:, None, None] + (pal[ink] - pal[bg])[:, None, None] * masks[..., None]
    images = images.round().clamp(0, 255).to(torch.uint8).numpy()
    via_8px = (torch.rand(n, generator=g) < 0.5).numpy()
    return glyph_boxes(np.stack([read_image(im)[2] for im in images]), via_8px), digits


def _shifted(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each input moved by -1, 0 or 1 px in x and y (zeros enter): handwriting's own jitter."""
    out = torch.empty_like(x)
    d = torch.randint(-1, 2, (len(x), 2), generator=g).tolist()
    for i, (dy, dx) in enumerate(d):
        out[i] = torch.roll(F.pad(x[i], (1, 1, 1, 1)), (dy, dx), dims=(-2, -1))[..., 1:-1, 1:-1]
    return out


def train_judge(
    out: Path = JUDGE_WEIGHTS_PATH,
    steps: int = 2000,
    batch: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    threads: int = 2,
    rendered: int = 24000,
    log=print,
) -> dict:
    """Train the judge on `rendered` glyphs of the held-out faces (rendered once) and two thirds of
    the UCI handwriting (a third of each batch), each input shifted by up to 1 px; save
    safetensors. Deterministic for a seed and thread count."""
    from testbed.diffusion.fonts import JUDGE_FACES

    uci_x, uci_y = uci_digits(held_out=False)
    n_uci = batch // 3
    with deterministic_cpu(seed, threads):
        g = torch.Generator().manual_seed(seed)
        parts = [_rendered(min(1000, rendered - i), g, JUDGE_FACES) for i in range(0, rendered, 1000)]
        font_x, font_y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        model = DigitJudge()
        loop = TrainingLoop(model, steps, lr, ema_decay=0.99, log=log)
        model.train()
        for it in range(steps):
            pick_f = torch.randint(0, len(font_y), (batch - n_uci,), generator=g)
            pick_u = torch.randint(0, len(uci_y), (n_uci,), generator=g)
            x = _shifted(torch.cat([font_x[pick_f], uci_x[pick_u]]), g)
            y = torch.cat([font_y[pick_f], uci_y[pick_u]])
            loop.step(it, F.cross_entropy(model(x), y, label_smoothing=0.05))
    return loop.save(out, {"judge": {"input_px": JUDGE_INPUT_PX, "steps": steps, "batch": batch, "lr": lr,
                                     "seed": seed, "threads": threads, "rendered": rendered,
                                     "faces": [f.file for f in JUDGE_FACES],
                                     "handwriting": f"sklearn.datasets.load_digits, all but every {_UCI_TEST_EVERY}rd"}})


@functools.lru_cache(maxsize=1)
def load_judge(path: Path = JUDGE_WEIGHTS_PATH) -> DigitJudge:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise WorkloadError(f"judge weights {path} are missing; run `testbed train-tiny --model judge` to make them")
    model = DigitJudge()
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.requires_grad_(False).eval()


def judge_digits(boxes: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Boxed glyphs -> the digit the judge names and its probability, per glyph."""
    with torch.no_grad():
        p = load_judge()(boxes).softmax(-1)
    conf, digit = p.max(-1)
    return digit.numpy(), conf.numpy()


def judge_images(images) -> list[Reading]:
    """(N, 32, 32, 3) uint8 generated images -> what each shows, as the judge reads it."""
    from testbed.diffusion.glyphs import read_image

    seen = [read_image(im) for im in images]
    digit, conf = judge_digits(glyph_boxes(np.stack([s[2] for s in seen])))
    return [Reading(int(d), float(c), s[1], s[0]) for d, c, s in zip(digit, conf, seen)]


def reads_as_prompted(prompt: str, reading: Reading) -> tuple[bool, bool]:
    """(the digit is the one asked for, ink and background are both the ones asked for)."""
    from testbed.model.prompts import parse_colour_prompt

    want = parse_colour_prompt(prompt)
    return reading.digit == want.digit, (reading.ink, reading.background) == (want.ink, want.background)


def fidelity_prompts(kind: str, seeds: int) -> list[tuple[str, int]]:
    """The (prompt, seed) pairs on which prompt fidelity is measured, digit by digit, `seeds` per
    digit: "white" -- 'a white D on a black background', seeds 0, 1, ...; "coloured" -- each
    image another of the 30 ink/background pairs (every pair once per 30 images), seeds 1000 + i;
    "plain" -- 'a handwritten D' (no colour named: white on black), seeds 2000, 2001, ..."""
    from testbed.model.prompts import COLOURS

    pairs = [(ink, bg) for ink in COLOURS for bg in COLOURS if ink != bg]
    out = []
    for d in range(10):
        for s in range(seeds):
            i = d * seeds + s
            if kind == "white":
                out.append((f"a white {d} on a black background", s))
            elif kind == "coloured":
                ink, bg = pairs[(7 * i) % len(pairs)]
                out.append((f"a {ink} {d} on a {bg} background", 1000 + i))
            elif kind == "plain":
                out.append((f"a handwritten {d}", 2000 + s))
            else:
                raise ValueError(f"fidelity_prompts: kind {kind!r} is not white, coloured or plain")
    return out
