"""The devices table (id, profile, precision, distance, rates, predicted T_j (mean) and its
p90 / E_j, selected, online) and the details panel of the highlighted device. Both render a `CellModel`.
"""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable, Static

from tui.cellmap import PRECISION_COLORS, profile_glyph
from tui.state import CellModel, short_profile

__all__ = ["DevicesTable", "DeviceDetails", "COLUMNS"]

#: (key, label) of the table's columns; tests read cells by these keys.
COLUMNS = (
    ("id", "id"), ("profile", "profile"), ("prec", "prec"), ("dist", "dist m"), ("up", "up Mb/s"),
    ("down", "dn Mb/s"), ("t_j", "T_j s"), ("p90", "p90"), ("e_j", "E_j J"), ("sel", "sel"), ("on", "on"),
)


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


class DevicesTable(DataTable):
    """One row per device, keyed by device id; `show()` refreshes every cell in place."""

    def __init__(self, **kw) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kw)

    def on_mount(self) -> None:
        for key, label in COLUMNS:
            self.add_column(label, key=key)

    def show(self, cell: CellModel, offline: set[str] | frozenset[str] = frozenset()) -> None:
        for row in cell.devices.values():
            on = row.online and row.id not in offline
            values = {
                "id": Text(row.id, style="bold" if row.order else ""),
                "profile": short_profile(row.profile),
                "prec": Text(row.precision, style=PRECISION_COLORS.get(row.precision, "")),
                "dist": Text(f"{row.distance_m:.0f}", justify="right"),
                "up": Text(f"{row.rate_up_mbps:.1f}", justify="right"),
                "down": Text(f"{row.rate_down_mbps:.1f}", justify="right"),
                "t_j": Text(_f(row.t_j_s, ".2f"), justify="right"),
                "p90": Text(_f(row.t_j_p90_s, ".2f"), justify="right", style="dim"),
                "e_j": Text(_f(row.e_j_j, ".1f"), justify="right"),
                "sel": Text(str(row.order) if row.order else "", style="bold blue", justify="center"),
                "on": Text("yes", style="green") if on else Text("no", style="bold red"),
            }
            if row.id not in self.rows:
                self.add_row(*values.values(), key=row.id)
            else:
                for key, v in values.items():
                    self.update_cell(row.id, key, v, update_width=True)

    def text_of(self, dev_id: str, column: str) -> str:
        v = self.get_cell(dev_id, column)
        return v.plain if isinstance(v, Text) else str(v)

    @property
    def highlighted_id(self) -> str | None:
        if self.row_count == 0:
            return None
        key, _ = self.coordinate_to_cell_key(self.cursor_coordinate)
        return key.value


class DeviceDetails(Static):
    """Everything known about one device: position, link, cost breakdown."""

    def show(self, cell: CellModel, dev_id: str | None) -> None:
        if dev_id is None or dev_id not in cell.devices:
            self.update("")
            return
        d = cell.devices[dev_id]
        cost = next((c for c in cell.costs if c.id == dev_id), None)
        t = Text()
        t.append(f"{d.id} ", style="bold")
        t.append(f"{profile_glyph(d.profile)} {short_profile(d.profile)} ")
        t.append(d.precision, style=PRECISION_COLORS.get(d.precision, ""))
        t.append(f"\n({d.x_m:.0f}, {d.y_m:.0f}) m, {d.distance_m:.0f} m {'LOS' if d.los else 'NLOS'}")
        t.append(f"\nup {d.rate_up_mbps:.1f} / dn {d.rate_down_mbps:.1f} Mbit/s")
        st = cell.model.stage(dev_id) if cell.model is not None else None
        if st is not None:  # means of the modelled distributions, and their p90
            t.append(f"\nT_j {st.latency.mean():.2f} s = {st.t_down.mean():.2f}+{st.cost.t_cmp_s:.2f}+"
                     f"{st.t_up.mean():.2f}")
            t.append(f"\n p90 {st.latency.quantile(0.9):.2f} s (down {st.t_down.quantile(0.9):.2f}, "
                     f"up {st.t_up.quantile(0.9):.2f})", style="dim")
        elif cost is not None:
            t.append(f"\nT_j {cost.latency_s:.2f} s = {cost.t_down_s:.2f}+{cost.t_cmp_s:.2f}+{cost.t_up_s:.2f}")
        if cost is not None:
            t.append(f"\nE_j {cost.energy_j:.1f} J = {cost.e_down_j:.1f}+{cost.e_cmp_j:.1f}+{cost.e_up_j:.1f}")
            t.append(f"\nmodel {cost.size_mb:.0f} MB")
        if d.order:
            t.append(f"\nstage {d.order} of {len(cell.chain)}", style="bold blue")
        t.append("\n\n")
        t.append("◉ server  O orin  X xavier\n", style="dim")
        for prec, color in PRECISION_COLORS.items():
            t.append(f"{prec} ", style=color)
        self.update(t)
