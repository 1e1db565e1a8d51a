"""The cell map: server and devices of the 500 x 500 m cell drawn to scale in characters.

A device is a letter for its profile (O = Orin, X = Xavier, ...) coloured by precision;
the selected relay chain is drawn as numbered spokes from the server (stage order), the
device of the running stage is highlighted, offline devices are red crosses. Positions
come from `CellModel`, which mobility updates; the widget only renders.
"""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual.widget import Widget

from tui.state import CellModel, short_profile

__all__ = ["CellMap", "PRECISION_COLORS", "profile_glyph", "map_grid"]

PRECISION_COLORS = {"fp32": "green", "fp16": "cyan", "int8": "yellow", "int4": "magenta"}


def profile_glyph(profile: str) -> str:
    return short_profile(profile)[:1].upper() or "?"


def _bresenham(c0: int, r0: int, c1: int, r1: int) -> list[tuple[int, int]]:
    pts = []
    dc, dr = abs(c1 - c0), -abs(r1 - r0)
    sc, sr = (1 if c0 < c1 else -1), (1 if r0 < r1 else -1)
    err = dc + dr
    while True:
        pts.append((c0, r0))
        if c0 == c1 and r0 == r1:
            return pts
        e2 = 2 * err
        if e2 >= dr:
            err += dr
            c0 += sc
        if e2 <= dc:
            err += dc
            r0 += sr


def map_grid(cell: CellModel, width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, cols, rows) of the drawing area inside width x height, to scale
    (a character is about twice as tall as it is wide)."""
    area = cell.topo.area
    aspect = area.width_m / area.height_m  # metres wide per metre tall
    cols = min(width, int(2 * height * aspect))
    rows = max(1, min(height, int(round(cols / (2 * aspect)))))
    cols = max(1, cols)
    return (width - cols) // 2, (height - rows) // 2, cols, rows


class CellMap(Widget):
    """Renders a `CellModel`; call `refresh()` after the model changes."""

    DEFAULT_CSS = """
    CellMap { height: 1fr; min-width: 20; }
    """

    def __init__(self, cell: CellModel, *, id: str | None = None) -> None:  # noqa: A002
        super().__init__(id=id)
        self.cell = cell
        self.active: str | None = None  # device of the running stage
        self.offline: set[str] = set()

    def cell_of(self, x_m: float, y_m: float, width: int, height: int) -> tuple[int, int]:
        left, top, cols, rows = map_grid(self.cell, width, height)
        area = self.cell.topo.area
        c = left + min(cols - 1, int(x_m / area.width_m * cols))
        r = top + min(rows - 1, int((1 - y_m / area.height_m) * rows))
        return c, r

    def render(self) -> Text:
        w, h = self.content_size.width, self.content_size.height
        if w < 4 or h < 3:
            return Text("")
        chars = [[" "] * w for _ in range(h)]
        styles: list[list[Style | None]] = [[None] * w for _ in range(h)]
        left, top, cols, rows = map_grid(self.cell, w, h)
        dim = Style(color="grey35")
        for r in range(top, top + rows):  # faint frame of the cell (the widget border is the window)
            for c in (left, left + cols - 1):
                chars[r][c], styles[r][c] = "┊", dim
        for c in range(left, left + cols):
            for r in (top, top + rows - 1):
                chars[r][c], styles[r][c] = "┈", dim
        sc, sr = self.cell_of(self.cell.server_x_m, self.cell.server_y_m, w, h)
        for i, dev_id in enumerate(self.cell.chain, 1):
            row = self.cell.devices.get(dev_id)
            if row is None:
                continue
            dc, dr = self.cell_of(row.x_m, row.y_m, w, h)
            hot = dev_id == self.active
            st = Style(color="yellow" if hot else "blue", bold=hot)
            for c, r in _bresenham(sc, sr, dc, dr)[1:-1]:
                chars[r][c], styles[r][c] = ("•" if hot else "·"), st
        for row in self.cell.devices.values():
            c, r = self.cell_of(row.x_m, row.y_m, w, h)
            color = PRECISION_COLORS.get(row.precision, "white")
            if row.id in self.offline or not row.online:
                chars[r][c], styles[r][c] = "✗", Style(color="red", bold=True)
                continue
            chars[r][c] = profile_glyph(row.profile)
            styles[r][c] = Style(color=color, bold=True, reverse=row.order is not None)
            if row.order is not None and c + 1 < w:
                chars[r][c + 1] = str(row.order) if row.order < 10 else "+"
                styles[r][c + 1] = Style(color="yellow" if row.id == self.active else "blue", bold=True)
        chars[sr][sc], styles[sr][sc] = "◉", Style(color="white", bold=True)
        text = Text(no_wrap=True, overflow="crop")
        for r in range(h):
            for c in range(w):
                text.append(chars[r][c], styles[r][c])
            if r < h - 1:
                text.append("\n")
        return text
