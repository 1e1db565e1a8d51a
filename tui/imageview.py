"""An image in the terminal: each character cell shows two pixels with the upper-half block
(foreground = upper pixel, background = lower pixel). Takes uint8 numpy arrays (H x W x 3
or H x W); box-averages them down to the widget's size, keeping the aspect ratio.
"""

from __future__ import annotations

import numpy as np
from rich.align import Align
from rich.color import Color
from rich.style import Style
from rich.text import Text
from textual.widget import Widget

__all__ = ["ImageView", "fit_image", "halfblock_text"]


def fit_image(img: np.ndarray, max_cols: int, max_rows: int) -> np.ndarray:
    """Resize `img` to fit max_cols x (2 * max_rows) pixels, keeping the aspect: box average
    when shrinking, nearest pixel when enlarging (the tiny model's images are 32 px)."""
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = np.asarray(img[..., :3], dtype=np.float32)
    h, w = img.shape[:2]
    scale = min(max_cols / w, 2 * max_rows / h)
    tw, th = max(1, int(w * scale)), max(2, int(h * scale) // 2 * 2)
    ys = np.linspace(0, h, th + 1).astype(int)
    xs = np.linspace(0, w, tw + 1).astype(int)
    out = np.empty((th, tw, 3), dtype=np.float32)
    for i in range(th):
        band = img[ys[i]:max(ys[i + 1], ys[i] + 1)]
        for j in range(tw):
            out[i, j] = band[:, xs[j]:max(xs[j + 1], xs[j] + 1)].mean(axis=(0, 1))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def halfblock_text(px: np.ndarray) -> Text:
    """Text of px.shape[0] // 2 lines: '▀' with the upper pixel as colour, the lower as background."""
    text = Text(no_wrap=True, overflow="crop")
    for r in range(0, px.shape[0] - 1, 2):
        if r:
            text.append("\n")
        for c in range(px.shape[1]):
            up, lo = px[r, c], px[r + 1, c]
            text.append("▀", Style(color=Color.from_rgb(*map(int, up)), bgcolor=Color.from_rgb(*map(int, lo))))
    return text


class ImageView(Widget):
    DEFAULT_CSS = """
    ImageView { height: 1fr; width: 1fr; }
    """

    def __init__(self, *, id: str | None = None, placeholder: str = "no image yet") -> None:  # noqa: A002
        super().__init__(id=id)
        self.image: np.ndarray | None = None
        self.placeholder = placeholder

    def set_image(self, img: np.ndarray | None) -> None:
        self.image = img
        self.refresh()

    def render(self) -> Text | Align:
        if self.image is None:
            return Text(self.placeholder, style="dim")
        w, h = self.content_size.width, self.content_size.height
        if w < 2 or h < 1:
            return Text("")
        return Align.center(halfblock_text(fit_image(self.image, w, h)))
