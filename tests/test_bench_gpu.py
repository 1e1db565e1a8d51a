"""bench/gpu.py without a GPU: its plan of scenarios, the ratios it reports, its timing
loop, and a --dry-run end to end (CPU, tiny sizes, no MPS): workers in their own
processes, released side by side, dropped to node uids as root, the JSON it writes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


gpu = _load("gpu")
gpu_worker = sys.modules["gpu_worker"]


def test_scenarios_one_worker_per_share_then_a_pair() -> None:
    plan = gpu.plan_scenarios([100, 50, 25], baseline=True, pair=True, root=True)
    assert [(s.name, s.shares, s.drop_uids) for s in plan] == [
        ("no-mps", (None,), False), ("share-100", (100,), False), ("share-50", (50,), False),
        ("share-25", (25,), False), ("pair-50", (50, 50), False), ("pair-50-uids", (50, 50), True)]
    assert [s.name for s in gpu.plan_scenarios([50], baseline=False, pair=True, root=False)] == ["share-50", "pair-50"]
    combos = gpu.plan_combos(["tiny", "sd15"], ["fp32", "int8"], 2, ["graph", "eager"])
    assert len(combos) == 8 and gpu_worker.combo_key(combos[0]) == "tiny/fp32/graph/b2"


def _row(scenario: str, share: int | None, step_s: float, worker: int = 0, **kw) -> dict:
    return {"scenario": scenario, "worker": worker, "share_pct": share, "model": "sd15", "precision": "bf16",
            "mode": "graph", "batch": 2, "step_s": step_s, **kw}


def test_ratios_against_100_and_against_one_at_50() -> None:
    rows = [_row("no-mps", None, 0.0095), _row("share-100", 100, 0.010), _row("share-50", 50, 0.021),
            _row("share-25", 25, 0.052), _row("pair-50", 50, 0.022, 0), _row("pair-50", 50, 0.030, 1),
            _row("share-50", 50, 0.0, error="OutOfMemoryError")]
    checks = gpu.add_ratios(rows)
    assert rows[1]["x_no_mps"] == pytest.approx(0.010 / 0.0095)
    assert rows[2]["x_100"] == pytest.approx(2.1) and rows[2]["expected_x_100"] == 2
    assert rows[4]["x_one_at_50"] == pytest.approx(0.022 / 0.021)
    got = {(c["scenario"], c["worker"]): (c["ratio"], c["expected"], c["within_20pct"]) for c in checks}
    assert got == {("share-50", 0): (2.1, 2.0, True), ("share-25", 0): (5.2, 4.0, False),
                   ("pair-50", 0): (1.048, 1.0, True), ("pair-50", 1): (1.429, 1.0, False)}


def test_table_names_the_gpu_and_shows_errors() -> None:
    rows = [_row("share-100", 100, 0.010, tflop_s=160.7), _row("share-50", 50, 0.0, error="RuntimeError: boom")]
    doc = {"machine": {"gpu": "NVIDIA H100 80GB HBM3", "driver": "580", "torch": "2.11", "diffusers": "0.42.1",
                       "date": "2026-12-06 10:00 UTC"}, "dry_run": False, "rows": rows,
           "checks": gpu.add_ratios(rows), "skipped": ["pair-50-uids: 10 s of --budget-s left"]}
    text = gpu.format_table(doc)
    assert text.splitlines()[0].startswith("GPU: NVIDIA H100 80GB HBM3 (driver 580)")
    assert "10.000" in text and "160.7" in text and "error: RuntimeError: boom" in text and "skipped: pair-50" in text


def test_measure_times_back_to_back_steps() -> None:
    calls = []

    def step() -> None:
        calls.append(1)
        time.sleep(0.002)

    step_s, n = gpu_worker.measure(step, lambda: None, window_s=0.1)
    assert len(calls) == n + 2 and n >= 20  # two warm-ups, then the window
    assert 0.002 <= step_s < 0.004


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--dry-run", "--shares", "50",
                        "--precisions", "int8", "--no-baseline", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["dry_run"] and not doc["partial"] and doc["kind"] == "measured" and doc["skipped"] == []
    assert "GPU: cpu (dry run)" in r.stdout and "wrote" in r.stdout
    pairs = ["pair-50", "pair-50-uids"] if os.geteuid() == 0 else ["pair-50"]
    assert list(doc["scenarios"]) == ["share-50", *pairs]
    for name in pairs:
        rows = [x for x in doc["rows"] if x["scenario"] == name]
        assert sorted((x["worker"], x["model"]) for x in rows) == [(0, "sd15"), (0, "tiny"), (1, "sd15"), (1, "tiny")]
        assert all(x["step_s"] > 0 and x["x_one_at_50"] > 0 and x["share_pct"] == 50 for x in rows)
        assert doc["scenarios"][name]["share_env"] == ["50", "50"]
    if os.geteuid() == 0:  # the workers dropped to two distinct node uids after their setup, as agents do
        uids = doc["scenarios"]["pair-50-uids"]["uids"]
        assert len(set(uids)) == 2 and all(2_000_000_000 <= u < 2_001_000_000 for u in uids)
    assert len(doc["checks"]) == 2 * len(pairs) * 2  # a ratio per pair worker and combination
