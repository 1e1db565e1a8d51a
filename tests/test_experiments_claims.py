"""The paper's three claims, checked from measured numbers of a reduced Fig. 4 sweep on the
emulation (paper.yaml with 8 devices, T_max {1, 2, 4} s, E_max 200 J, one seed; real
relays, real split agents, shaped links). About two minutes on two cores.

Claims 1 and 3 must hold. Claim 2 (w/ DS beats w/o DS in MS-SSIM) does not hold on this
cell at T_max 4 s (README "Reproducing the paper"): the DP maximizes the paper's quality
proxy, the total model size, and picks two large-precision Xaviers (10 steps) where the
random order fits three smaller models (15 steps) — and the tiny model's quality follows
steps, not precision. What is asserted for claim 2 is what the paper's selection promises
and the runs measured: at every point the devices that ran under w/ DS add up to at least
the model size of those under w/o DS; the MS-SSIM verdict is reported, not asserted.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from testbed.experiments.sweep import SweepConfig, parse_runs, run_sweep
from testbed.experiments.claims import claims_markdown, evaluate_claims, tran_share_by_tmax

REPO = Path(__file__).resolve().parent.parent
REDUCED = REPO / "topologies" / "scenarios" / "sweeps" / "fig4-small.yaml"


@pytest.mark.root
async def test_paper_claims_on_a_reduced_sweep(tmp_path):
    cfg = SweepConfig(file=REDUCED, t_max_s=[1.0, 2.0, 4.0], e_max_j=[200.0], seeds=[1],
                      runs=parse_runs("multistage:dp,multistage:random,split"), out_dir=tmp_path)
    outcome = await run_sweep(cfg)
    rows = outcome.rows
    assert len(rows) == cfg.total == 9
    # every number below was measured: each feasible row has measured times from its stages
    for r in rows:
        if r["feasible"]:
            assert r["t_tran_s"] > 0 and r["t_cmp_s"] > 0 and r["total_steps"] >= 1 and r["latency_s"] > 0
    claims = {c.number: c for c in evaluate_claims(rows)}
    table = claims_markdown(list(claims.values()))
    assert claims[1].holds is True, table
    assert claims[3].holds is True, table
    # claim 3 in numbers: multi-stage's share falls from the smallest to the largest T_max,
    # split's stays above one half
    ms = tran_share_by_tmax(rows, "multistage:dp", 200.0)
    sp = tran_share_by_tmax(rows, "split", 200.0)
    assert ms[1.0] > ms[4.0] and min(sp.values()) > 0.5, table
    # claim 2: the selection's objective, from the runs' own documents
    docs = [json.loads(line) for line in outcome.jsonl_path.read_text().splitlines()]
    size = {(d["strategy"], d["t_max_s"]): d.get("objective_mb", 0.0)
            for d in docs if d.get("method") == "multistage"}
    for t in cfg.t_max_s:
        assert size[("dp", t)] >= size[("random", t)] - 1e-6, (t, size)
    if not claims[2].holds:
        warnings.warn(f"claim 2 (MS-SSIM) does not hold on the reduced cell: {claims[2].measured}", stacklevel=1)
