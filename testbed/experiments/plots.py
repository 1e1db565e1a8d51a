"""Figures of Fig. 4 from a sweep's results.csv (matplotlib, Agg backend; files only).

- fig4a_quality_vs_tmax.png: MS-SSIM vs T_max at the reference E_max, mean and spread
  (min-max band, +/- 1 std bars) over seeds, one line per method;
- fig4b_quality_vs_emax.png: the same vs E_max at the reference T_max;
- fig4c_time_breakdown.png: share of transmission vs computation time per method as
  T_max grows (stacked bars; sums over seeds of measured t_tran and of t_cmp, which is
  emulated in `compute: profile`);
- fig4d_images.png: each method's image at every T_max (first seed, reference E_max) —
  same prompt and same initial noise within a seed;
- fig_confidence.png (a sweep with `--confidence`): per compared run, the share of runs
  whose measured latency kept T_max at each P asked for (and mean-based), with 95 %
  Wilson intervals, beside the plans' modelled probability and the P itself.

Fig. 4 compares the mean-based plans (the paper's); runs planned with a confidence appear
only in fig_confidence.

A run whose budgets admit no stage delivers no image: it counts as MS-SSIM 0 in the means
(marked with an open marker) — "nothing within the budget" is the worst quality.

Every axis says what its numbers are (measured, emulated or modelled; columns.json), and
every figure carries its provenance — topology, seeds, the commit that produced it — in
a caption and in the PNG's text chunks (Source: the commit; Description: the caption).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from testbed.methods import METHODS, PAPER_RUNS, line_for, method

__all__ = ["CONFIDENCE_FIGURE", "aggregate", "breakdown_figure", "confidence_figure", "objective_note", "provenance", "quality", "quality_figure",
           "reference_budget", "short_commit", "write_figures", "FIGURES"]

FIGURES = ("fig4a_quality_vs_tmax.png", "fig4b_quality_vs_emax.png", "fig4c_time_breakdown.png", "fig4d_images.png")
CONFIDENCE_FIGURE = "fig_confidence.png"
def _selector(row: dict[str, Any]) -> str:
    return row.get("selector") or row["strategy"]


def _label(row: dict[str, Any]) -> str:
    return line_for(row["method"], _selector(row)).label


def _rank(row: dict[str, Any]) -> tuple[int, int]:
    """Methods in the registry's order; a method's lines in the order it lists them."""
    names, spec = list(METHODS), method(row["method"])
    keys = list(spec.lines)
    sel = _selector(row)
    return names.index(spec.name), keys.index(sel) if sel in keys else len(keys)


def _labels(rows: list[dict[str, Any]]) -> list[str]:
    ranked = sorted({(_rank(r), _label(r)) for r in rows})
    return list(dict.fromkeys(label for _, label in ranked))


def _styles(rows: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """label -> the registry's colour and marker for it."""
    out = {}
    for r in rows:
        ln = line_for(r["method"], _selector(r))
        out[ln.label] = {"color": ln.color, "marker": ln.marker}
    return out


def _is_ds(row: dict[str, Any]) -> bool:
    """A run of the paper's multi-stage diffusion with device selection (w/ DS)."""
    from testbed.experiments.sweep import row_key

    return row_key(row) == PAPER_RUNS["ds"]


def reference_budget(values: list[float], preferred: float) -> float:
    """The paper's default budget when the sweep has it, else the largest swept value."""
    return preferred if preferred in values else max(values)


def quality(row: dict[str, Any]) -> float:
    q = row.get("ms_ssim")
    return float(q) if row.get("feasible") and q is not None else 0.0


def aggregate(rows: list[dict[str, Any]], x_key: str, fixed_key: str, fixed: float) -> dict[str, list[dict[str, float]]]:
    """Per method: for each x, mean/std/min/max of MS-SSIM over seeds and the infeasible count."""
    groups: dict[str, dict[float, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r[fixed_key] == fixed:
            groups[_label(r)][float(r[x_key])].append(r)
    out: dict[str, list[dict[str, float]]] = {}
    for label, by_x in groups.items():
        series = []
        for x in sorted(by_x):
            qs = np.array([quality(r) for r in by_x[x]])
            series.append({
                "x": x, "mean": float(qs.mean()), "std": float(qs.std()), "min": float(qs.min()),
                "max": float(qs.max()), "n": float(len(qs)),
                "infeasible": float(sum(1 for r in by_x[x] if not r.get("feasible"))),
                "steps": float(np.mean([r.get("total_steps") or 0 for r in by_x[x]])),
            })
        out[label] = series
    return out


def _quality_plot(ax: Any, rows: list[dict[str, Any]], agg: dict[str, list[dict[str, float]]], xlabel: str,
                  title: str) -> None:
    """Mean MS-SSIM per method with its spread over seeds. The legend sits below the axes
    (inside, it covered points at the right edge: split's E_max = 200 J), and explains the
    open marker there rather than in a note over the data."""
    from matplotlib.lines import Line2D

    styles = _styles(rows)
    for label in [lb for lb in _labels(rows) if lb in agg]:
        s = agg[label]
        st = styles.get(label, {"color": "gray", "marker": "x"})
        x = [p["x"] for p in s]
        m = np.array([p["mean"] for p in s])
        ax.fill_between(x, [p["min"] for p in s], [p["max"] for p in s], color=st["color"], alpha=0.15, lw=0)
        ax.errorbar(x, m, yerr=[p["std"] for p in s], color=st["color"], marker=st["marker"], capsize=3, lw=2,
                    ms=7, label=label)
        for p in s:
            if p["infeasible"]:
                ax.plot(p["x"], p["mean"], marker=st["marker"], ms=12, mfc="white", mec=st["color"], mew=1.5)
    handles, labels = ax.get_legend_handles_labels()
    if any(p["infeasible"] for s in agg.values() for p in s):
        handles.append(Line2D([], [], ls="none", marker="o", ms=9, mfc="white", mec="dimgray", mew=1.5))
        labels.append("open marker: a seed had no image within the budgets (counted as 0)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("MS-SSIM vs fp32 reference (measured)")
    ax.set_title(title)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(handles, labels, fontsize=8, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.14))


def objective_note(rows: list[dict[str, Any]], e_ref: float) -> str | None:
    """Where w/ DS's quality falls as T_max grows (at E_max `e_ref`), why: the DP maximises
    the total model size (the paper's objective), not MS-SSIM, so a larger budget can buy
    more, smaller (quantized) models over fewer large ones. None when it never falls."""
    ds = [r for r in rows if _is_ds(r)]
    agg = next(iter(aggregate(ds, "t_max_s", "e_max_j", e_ref).values()), [])
    for lo, hi in zip(agg, agg[1:]):
        if hi["mean"] >= lo["mean"]:
            continue
        by_seed = {}
        for r in rows:
            if _is_ds(r) and r["e_max_j"] == e_ref and r.get("feasible"):
                by_seed.setdefault(r["seed"], {})[float(r["t_max_s"])] = r
        drops = [(quality(v[lo["x"]]) - quality(v[hi["x"]]), seed, v[lo["x"]], v[hi["x"]])
                 for seed, v in by_seed.items() if lo["x"] in v and hi["x"] in v]
        worst = max(drops, key=lambda d: d[0], default=None)
        seed_part = ""
        if worst is not None and worst[0] > 0:
            _, seed, a, b = worst
            seed_part = (f"; seed {seed}: {quality(b):.2f} with {b['total_steps']} steps at {hi['x']:g} s against "
                         f"{quality(a):.2f} with {a['total_steps']} at {lo['x']:g} s")
        return (f"w/ DS falls from {lo['mean']:.3f} at T_max {lo['x']:g} s ({lo['steps']:.0f} steps on average) to "
                f"{hi['mean']:.3f} at {hi['x']:g} s ({hi['steps']:.0f} steps): the DP maximises total model size "
                f"(the paper's objective), not MS-SSIM, and a larger T_max buys more, smaller (quantized) models"
                f"{seed_part}")
    return None


def _time_breakdown(ax: Any, rows: list[dict[str, Any]], e_ref: float, t_values: list[float]) -> None:
    """Stacked transmission / computation shares per method and T_max. A method with no
    run within the budgets at a T_max gets an "infeasible" mark instead of a silent gap;
    one that ran on only some seeds says on how many."""
    labels = _labels(rows)
    width = 0.8 / max(1, len(labels))
    short = False  # some point ran on fewer seeds than asked (or on none)
    for j, label in enumerate(labels):
        tran, cmp_, ran, asked = [], [], [], []
        for t in t_values:
            point = [r for r in rows if _label(r) == label and r["t_max_s"] == t and r["e_max_j"] == e_ref]
            sel = [r for r in point if r.get("feasible")]
            tt = sum(float(r["t_tran_s"] or 0) for r in sel)
            tc = sum(float(r["t_cmp_s"] or 0) for r in sel)
            tot = tt + tc
            tran.append(tt / tot if tot else np.nan)
            cmp_.append(tc / tot if tot else np.nan)
            ran.append(len(sel))
            asked.append(len(point))
        xs = np.arange(len(t_values)) + (j - (len(labels) - 1) / 2) * width
        st = _styles(rows).get(label, {"color": "gray"})
        ax.bar(xs, tran, width * 0.95, color=st["color"], edgecolor="black", lw=0.5,
               label=f"{label}: transmission (measured)")
        ax.bar(xs, cmp_, width * 0.95, bottom=tran, color=st["color"], alpha=0.35, edgecolor="black", lw=0.5,
               hatch="//", label=f"{label}: computation ({_cmp_kind(rows)})")
        for x, v, n, of in zip(xs, tran, ran, asked):
            if not of:
                continue  # not swept: nothing to say
            short = short or n < of
            if np.isnan(v):
                ax.bar(x, 1.0, width * 0.95, color="none", edgecolor=st["color"], lw=0.8, ls="--")
                ax.text(x, 0.5, "infeasible", rotation=90, ha="center", va="center", fontsize=8, color=st["color"])
                continue
            ax.text(x, min(v, 0.93) + 0.02, f"{100 * v:.0f}%", ha="center", fontsize=8)
            if n < of:
                ax.text(x, 1.015, f"{n}/{of}", ha="center", fontsize=7, color="dimgray")
    ax.set_xticks(np.arange(len(t_values)), [f"{t:g}" for t in t_values])
    ax.set_xlabel("T_max (s)")
    ax.set_ylabel(f"share of t_tran (measured) + t_cmp ({_cmp_kind(rows)})")
    ax.set_ylim(0, 1.12)
    ax.set_title(f"Fig. 4(c): transmission vs computation (E_max = {e_ref:g} J)")
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    if short:
        ax.text(0.995, 0.995, "n/N over a bar: n of N seeds had a plan within the budgets; infeasible: none had",
                transform=ax.transAxes, ha="right", va="top", fontsize=7, color="dimgray")


def _cmp_kind(rows: list[dict[str, Any]]) -> str:
    """What the rows' t_cmp is: the profiles' time (emulated) unless every run computed for real."""
    modes = {r.get("compute") for r in rows}
    return "measured" if modes == {"real"} else "emulated: profile time"


def _images(fig: Any, rows: list[dict[str, Any]], out_dir: Path, e_ref: float, t_values: list[float]) -> None:
    from PIL import Image

    seed = min(r["seed"] for r in rows)
    labels = _labels(rows)
    axes = fig.subplots(len(labels), len(t_values), squeeze=False)
    for i, label in enumerate(labels):
        for j, t in enumerate(t_values):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            row = next((r for r in rows if _label(r) == label and r["t_max_s"] == t and r["e_max_j"] == e_ref
                        and r["seed"] == seed), None)
            if row is not None and row.get("image") and (out_dir / row["image"]).is_file():
                img = np.asarray(Image.open(out_dir / row["image"]))
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
                ax.set_xlabel(f"MS-SSIM {row['ms_ssim']:.2f}, {row['total_steps']} steps", fontsize=8)
            else:
                ax.text(0.5, 0.5, "no image\nwithin budget", ha="center", va="center", fontsize=9,
                        transform=ax.transAxes)
            if i == 0:
                ax.set_title(f"T_max = {t:g} s", fontsize=10)
            if j == 0:
                ax.set_ylabel(label, fontsize=10)
    fig.suptitle(f"Fig. 4(d): generated images (seed {seed}, E_max = {e_ref:g} J; same prompt and noise)")


def write_figures(csv_path: Path, out_dir: Path | None = None, source: dict[str, Any] | None = None) -> list[Path]:
    """Draw the four figures (of the mean-based rows) from a results.csv, and fig_confidence
    when the sweep planned with confidences; returns their paths.

    `source` is the sweep's record (sweep.json next to the CSV when not given): its
    topology, seeds and commit go into every figure's caption and PNG metadata."""
    import matplotlib

    matplotlib.use("Agg")

    from testbed.experiments.sweep import mean_based, read_rows

    csv_path = Path(csv_path)
    out_dir = Path(out_dir) if out_dir is not None else csv_path.parent
    every = read_rows(csv_path)
    rows = mean_based(every)
    if not every:
        return []
    if source is None and (csv_path.parent / "sweep.json").is_file():
        source = json.loads((csv_path.parent / "sweep.json").read_text())
    caption = provenance(source or {}, every)
    paths = _fig4(rows, out_dir, caption, source) if rows else []
    if len(rows) < len(every):  # planned with confidences: how often they kept T_max
        from testbed.experiments.confidence import within_by_confidence

        paths.append(_save(confidence_figure(within_by_confidence(every)), out_dir / CONFIDENCE_FIGURE, caption,
                           source))
    return paths


def _fig4(rows: list[dict[str, Any]], out_dir: Path, caption: str, source: dict[str, Any] | None) -> list[Path]:
    import matplotlib.pyplot as plt  # (Agg: write_figures chose it)

    t_values = sorted({float(r["t_max_s"]) for r in rows})
    e_values = sorted({float(r["e_max_j"]) for r in rows})
    e_ref, t_ref = reference_budget(e_values, 200.0), reference_budget(t_values, 2.0)
    n_seeds = len({r["seed"] for r in rows})
    paths = []
    fig = quality_figure(rows, "t_max_s", "e_max_j", e_ref,
                         f"Fig. 4(a): quality vs T_max (E_max = {e_ref:g} J, {n_seeds} seeds)")
    paths.append(_save(fig, out_dir / FIGURES[0], caption, source, note=objective_note(rows, e_ref)))
    fig = quality_figure(rows, "e_max_j", "t_max_s", t_ref,
                         f"Fig. 4(b): quality vs E_max (T_max = {t_ref:g} s, {n_seeds} seeds)")
    paths.append(_save(fig, out_dir / FIGURES[1], caption, source))
    paths.append(_save(breakdown_figure(rows, e_ref, t_values), out_dir / FIGURES[2], caption, source))

    if not any(r.get("image") and (out_dir / r["image"]).is_file() for r in rows):
        return paths  # no image files (docs/figures keeps only the figure): fig4d stays as drawn
    labels = _labels(rows)
    fig = plt.figure(figsize=(1.9 * len(t_values) + 1.2, 2.0 * len(labels) + 1.0), dpi=120)
    _images(fig, rows, out_dir, e_ref, t_values)
    paths.append(_save(fig, out_dir / FIGURES[3], caption, source))
    return paths


def quality_figure(rows: list[dict[str, Any]], x_key: str, fixed_key: str, fixed: float, title: str) -> Any:
    """Fig. 4(a) (x_key t_max_s at E_max `fixed`) or 4(b) (e_max_j at T_max `fixed`), not saved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = 6.0 if x_key == "t_max_s" else 5.6  # 4(a) carries a note under its legend
    fig, ax = plt.subplots(figsize=(6.4, height), dpi=120)
    _quality_plot(ax, rows, aggregate(rows, x_key, fixed_key, fixed), "T_max (s)" if x_key == "t_max_s" else "E_max (J)",
                  title)
    return fig


def breakdown_figure(rows: list[dict[str, Any]], e_ref: float, t_values: list[float]) -> Any:
    """Fig. 4(c), not saved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.6), dpi=120)
    _time_breakdown(ax, rows, e_ref, t_values)
    return fig


def confidence_figure(summary: list[dict[str, Any]]) -> Any:
    """Share of runs within T_max (measured, 95 % Wilson interval) per P asked for, one line
    per compared run; the plans' mean modelled P(within) as open markers and the P itself
    as a dash (where a plan keeps its promise, the share sits on or above it). Not saved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted({s["confidence"] for s in summary if s["confidence"] is not None})
    ticks = ["mean"] * any(s["confidence"] is None for s in summary) + [f"{p:g}" for p in levels]
    pos = {t: i for i, t in enumerate(ticks)}
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    runs = list(dict.fromkeys(s["run"] for s in summary))
    for n, run in enumerate(runs):
        ms, sel = run.partition(":")[0], run.partition(":")[2] or None
        ln = line_for(ms, sel or method(ms).own_selector or "dp")
        pts = [s for s in summary if s["run"] == run and s["runs"]]
        x = np.array([pos["mean" if s["confidence"] is None else f"{s['confidence']:g}"] for s in pts], dtype=float)
        x += (n - (len(runs) - 1) / 2) * 0.08  # side by side, not on top of each other
        y = np.array([s["share_within"] for s in pts])
        err = np.clip([[s["share_within"] - s["share_low"] for s in pts],
                       [s["share_high"] - s["share_within"] for s in pts]], 0.0, None)  # (Wilson's ends round)
        ax.errorbar(x, y, yerr=err, color=ln.color, marker=ln.marker, capsize=3, linestyle="-",
                    label=f"{ln.label}: measured share within T_max")
        model = np.array([s["p_within_mean"] for s in pts])
        ax.plot(x, model, color=ln.color, marker=ln.marker, markerfacecolor="none", linestyle=":",
                label=f"{ln.label}: modelled P(within), mean")
    for p in levels:
        ax.hlines(p, pos[f"{p:g}"] - 0.3, pos[f"{p:g}"] + 0.3, colors="black", linestyles="--", linewidth=1)
    ax.set_xticks(range(len(ticks)), ticks)
    ax.set_xlabel("P asked for (--confidence; mean: the mean-based plan)")
    ax.set_ylabel("share of runs with latency <= T_max")
    ax.set_ylim(0, 1.05)
    ax.set_title("Runs within T_max against the confidence planned for (dash: P)")
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def provenance(source: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The caption line: what was swept, from which commit, and what the numbers are."""
    seeds = sorted({int(r["seed"]) for r in rows})
    where = Path(str(source.get("topology", "?"))).name
    when = source.get("started_utc", "?")
    return (f"{where}, seeds {seeds[0]}-{seeds[-1]}, testbed commit {short_commit(source.get('commit'))}, "
            f"{when} UTC. MS-SSIM and t_tran measured; t_cmp {_cmp_kind(rows)}.")


def short_commit(commit: str | None) -> str:
    """12 hex digits, keeping a '-dirty' mark (uncommitted changes when the sweep ran)."""
    sha, _, mark = str(commit or "unknown").partition("-")
    return sha[:12] + (f"-{mark}" if mark else "")


def _save(fig: Any, path: Path, caption: str, source: dict[str, Any] | None, note: str | None = None) -> Path:
    """Lay out, add the caption (and a note above it, both below the axes), write with the
    provenance in the PNG's text chunks."""
    import matplotlib.pyplot as plt

    bottom = 0.04 + (0.10 if note else 0.0)  # the caption takes two lines, the note three
    fig.tight_layout(rect=(0, bottom, 1, 1))
    if note:
        fig.text(0.5, 0.05, note, ha="center", va="bottom", fontsize=7, color="black", wrap=True)
    fig.text(0.5, 0.008, caption, ha="center", va="bottom", fontsize=6.5, color="dimgray", wrap=True)
    description = caption + (f" Note: {note}" if note else "")
    fig.savefig(path, metadata={"Title": path.stem, "Source": str((source or {}).get("commit") or "unknown"),
                                "Description": description, "Software": "testbed experiments.plots"})
    plt.close(fig)
    return path
