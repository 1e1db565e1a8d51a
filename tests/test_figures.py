"""Fig. 4(a)-(c) drawn from the published sweep's results (docs/figures/results.csv, a real
sweep): nothing sits on the data — no note in the axes, no legend over a point —, a method
with no plan at a T_max is marked infeasible in 4(c), and where w/ DS's quality falls as
T_max grows the figure says why (the DP maximises model size)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from testbed.experiments.plots import breakdown_figure, objective_note, quality_figure
from testbed.experiments.sweep import read_rows

FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures"


@pytest.fixture(scope="module")
def rows():
    return read_rows(FIGURES / "results.csv")


def _boxes(fig):
    fig.canvas.draw()
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    return ax, ax.get_window_extent(renderer), ax.get_legend().get_window_extent(renderer)


@pytest.mark.parametrize("x_key,fixed_key,fixed", [("t_max_s", "e_max_j", 200.0), ("e_max_j", "t_max_s", 2.0)])
def test_quality_figures_keep_notes_and_legend_off_the_data(rows, x_key, fixed_key, fixed):
    import matplotlib.pyplot as plt

    fig = quality_figure(rows, x_key, fixed_key, fixed, "test")
    try:
        ax, axes_box, legend_box = _boxes(fig)
        assert list(ax.texts) == []  # 4(a)'s open-marker note sat on the axis area
        assert not axes_box.overlaps(legend_box)  # 4(b)'s legend covered split's E_max = 200 J point
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert any(lb.startswith("open marker") for lb in labels)  # split at T_max 1 s: 2 seeds without a plan
    finally:
        plt.close(fig)


def test_time_breakdown_marks_infeasible_points(rows):
    import matplotlib.pyplot as plt

    fig = breakdown_figure(rows, 200.0, [1.0, 2.0, 4.0])
    try:
        texts = [t.get_text() for t in fig.axes[0].texts]
        # patch had no plan at T_max 1 and 2 s on any seed: marked, not a silent gap
        none = {(r["method"], r["t_max_s"]) for r in rows if r["e_max_j"] == 200.0} - {
            (r["method"], r["t_max_s"]) for r in rows if r["e_max_j"] == 200.0 and r["feasible"]}
        assert none == {("patch", 1.0), ("patch", 2.0)}
        assert texts.count("infeasible") == len(none)
        assert "3/5" in texts  # split at 1 s: its bar is the 3 seeds that had a plan
    finally:
        plt.close(fig)


def test_the_dp_objective_is_named_where_its_quality_falls(rows):
    note = objective_note(rows, 200.0)
    assert note is not None
    assert "from 0.975 at T_max 2 s (10 steps on average) to 0.949 at 4 s (23 steps)" in note
    assert "maximises total model size" in note
    assert "seed 1: 0.88 with 25 steps at 4 s against 0.98 with 10 at 2 s" in note
    rising = [r for r in rows if r["t_max_s"] != 4.0]  # 1 s -> 2 s: quality rises, nothing to explain
    assert objective_note(rising, 200.0) is None
    # the published figure carries it (PNG Description, under the legend)
    assert note in Image.open(FIGURES / "fig4a_quality_vs_tmax.png").text["Description"]


def test_publish_redraws_the_published_sweep_from_its_own_folder(tmp_path, monkeypatch):
    """`testbed sweep --from docs/figures --publish docs` failed (it copied files onto
    themselves and wanted images docs/ does not keep); it redraws 4(a)-(c), keeps 4(d)."""
    import shutil

    from testbed.experiments.publish import publish

    docs = tmp_path / "docs"
    shutil.copytree(FIGURES, docs / "figures")
    shutil.copyfile(FIGURES.parent / "reproducing.md", docs / "reproducing.md")
    (docs / "figures" / "fig4a_quality_vs_tmax.png").unlink()
    fig4d = (docs / "figures" / "fig4d_images.png").read_bytes()
    monkeypatch.chdir(FIGURES.parent.parent)  # sweep.json's topology path is relative to the repository
    publish(docs / "figures", docs)
    assert (docs / "figures" / "fig4a_quality_vs_tmax.png").is_file()
    assert (docs / "figures" / "fig4d_images.png").read_bytes() == fig4d
    assert (docs / "reproducing.md").read_text() == (FIGURES.parent / "reproducing.md").read_text()
