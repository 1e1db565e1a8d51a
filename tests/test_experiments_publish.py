"""One command regenerates docs/figures and the generated tables of docs/reproducing.md;
the doc quotes claims.json (and the sweep's other records) verbatim."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from testbed.errors import InputError
from testbed.experiments.claims import claims_markdown
from testbed.experiments.plots import FIGURES
from testbed.experiments.publish import BLOCKS, binding_needs, generated_block, publish, render_blocks
from testbed.experiments.sweep import CSV_COLUMNS, column_labels

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
SMALL = REPO / "topologies" / "small.yaml"


def _fake_sweep(folder: Path) -> None:
    """A finished sweep's files: 3 seeds x T_max {1, 2} x E_max 200 J x w/ DS and split."""
    (folder / "images").mkdir(parents=True)
    rows = []
    for seed in (1, 2, 3):
        for t in (1.0, 2.0):
            for method, strategy, q in (("multistage", "dp", 0.5 + 0.1 * t), ("split", "best-pair", 0.1 * t)):
                image = f"images/{method}_t{t:g}_s{seed}.png"
                Image.new("L", (8, 8), int(100 * q)).save(folder / image)
                rows.append({**{k: "" for k in CSV_COLUMNS}, "method": method, "strategy": strategy, "t_max_s": t,
                             "e_max_j": 200.0, "seed": seed, "compute": "profile", "selected_count": 2,
                             "total_steps": 5, "latency_s": 0.9 * t, "energy_j": 20.0, "t_tran_s": 0.2,
                             "t_cmp_s": 0.6, "cmp_real_s": 0.05, "ms_ssim": q, "feasible": 1, "image": image})
    with open(folder / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    (folder / "columns.json").write_text(json.dumps(column_labels("profile")))
    (folder / "sweep.json").write_text(json.dumps({
        "topology": str(SMALL), "t_max_s": [1.0, 2.0], "e_max_j": [200.0], "seeds": [1, 2, 3],
        "runs": ["multistage:dp", "split"], "commit": "0123456789abcdef", "started_utc": "2025-01-01 00:00",
        "elapsed_s": 60.0, "cores": 2, "load_average_at_end": 1.0,
        "budgets": {"multistage:dp": {"runs": 6, "infeasible": 0, "within_t_max": 6, "within_e_max": 6}}}))


def _doc_with_markers(docs: Path) -> Path:
    docs.mkdir()
    body = "\n".join(f"## {b}\n<!-- generated:{b} -->\nstale\n<!-- /generated:{b} -->\n" for b in BLOCKS)
    (docs / "reproducing.md").write_text("# Reproducing\n\nhand-written text stays\n\n" + body)
    return docs / "reproducing.md"


def test_publish_regenerates_figures_claims_and_the_docs_tables(tmp_path):
    _fake_sweep(tmp_path / "sweep")
    doc = _doc_with_markers(tmp_path / "docs")
    publish(tmp_path / "sweep", tmp_path / "docs")
    text = doc.read_text()
    assert "hand-written text stays" in text and "stale" not in text
    figures = tmp_path / "docs" / "figures"
    claims = json.loads((figures / "claims.json").read_text())
    assert generated_block(text, "claims").startswith(claims_markdown(claims["claims"]))
    assert "commit `0123456789ab`" in generated_block(text, "claims")
    assert "| `cmp_real_s` | measured |" in generated_block(text, "columns")
    assert "| multistage:dp | 6 | 0 | 6 of 6 (100 %) |" in generated_block(text, "budgets")
    assert "Modelled" in generated_block(text, "energy")
    for name in FIGURES:
        meta = Image.open(figures / name).text
        assert meta["Source"] == "0123456789abcdef" and "commit 0123456789ab" in meta["Description"]
    assert not (figures / "images").exists()  # fig4d holds the images


def test_a_dirty_tree_stays_visible_in_the_short_commit():
    from testbed.experiments.plots import short_commit

    assert short_commit("0123456789abcdef-dirty") == "0123456789ab-dirty"
    assert short_commit("0123456789abcdef") == "0123456789ab" and short_commit(None) == "unknown"


def test_publish_names_what_is_missing(tmp_path):
    _fake_sweep(tmp_path / "sweep")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "reproducing.md").write_text("no markers here\n")
    with pytest.raises(InputError, match="generated:claims"):
        publish(tmp_path / "sweep", tmp_path / "docs")
    assert not (tmp_path / "docs" / "figures").exists()  # nothing half-published
    with pytest.raises(InputError, match="no sweep.json"):
        publish(tmp_path / "nothing", tmp_path / "docs")


def test_the_repository_docs_quote_their_sweep_verbatim():
    """docs/reproducing.md's generated blocks are exactly what docs/figures renders to."""
    figures = DOCS / "figures"
    sweep = json.loads((figures / "sweep.json").read_text())
    needs = binding_needs(sweep, REPO)
    text = (DOCS / "reproducing.md").read_text()
    for name, body in render_blocks(figures, needs).items():
        assert generated_block(text, name) == body, f"docs/reproducing.md block {name!r} is stale: republish"
    claims = json.loads((figures / "claims.json").read_text())
    assert [c["id"] for c in claims["claims"]] == [1, 2, 3, 4] and claims["source"]["commit"] == sweep["commit"]
    for name in FIGURES:
        assert Image.open(figures / name).text["Source"] == sweep["commit"]


def _rewrite_image(folder: Path, image: str) -> None:
    """The first row's image column set to `image` (a hostile or broken results.csv)."""
    with open(folder / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows[0]["image"] = image
    with open(folder / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)


@pytest.mark.parametrize("image", ["../../secret.png", "/etc/hostname", "images/../../secret.png", "images/link.png",
                                   "images/missing.png", "images/sub/x.png"])
def test_publish_reads_only_the_sweeps_own_images(tmp_path, image):
    _fake_sweep(tmp_path / "sweep")
    (tmp_path / "secret.png").write_bytes(b"not the sweep's")
    (tmp_path / "sweep" / "images" / "link.png").symlink_to(tmp_path / "secret.png")
    _rewrite_image(tmp_path / "sweep", image)
    _doc_with_markers(tmp_path / "docs")
    with pytest.raises(InputError, match=r"results.csv row 2: image"):
        publish(tmp_path / "sweep", tmp_path / "docs")
    assert not (tmp_path / "docs" / "figures").exists()  # refused before anything is written


def test_publish_never_removes_a_directory_it_did_not_make(tmp_path):
    from testbed.errors import ResourceError

    _fake_sweep(tmp_path / "sweep")
    _doc_with_markers(tmp_path / "docs")
    mine = tmp_path / "docs" / "figures" / "images"
    mine.mkdir(parents=True)
    (mine / "keep.png").write_bytes(b"the user's")
    with pytest.raises(ResourceError, match="not made by the testbed"):
        publish(tmp_path / "sweep", tmp_path / "docs")
    assert (mine / "keep.png").read_bytes() == b"the user's"
    (mine / "keep.png").unlink()
    mine.rmdir()
    publish(tmp_path / "sweep", tmp_path / "docs")  # its own copies: made, then removed
    assert not mine.exists()
