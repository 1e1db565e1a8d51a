"""The paper's claims as statistics over seeds (pure): synthetic sweeps where a claim clearly
holds, clearly fails, and sits in between; the seed as the unit, Holm across the sweep's
tests, the verdict rule and its reasons; claims.json's verdicts follow from its own
statistics; the terminal table."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from testbed.experiments.claims import (
    CLAIMS,
    claims_doc,
    claims_markdown,
    claims_table,
    claims_text,
    evaluate_claims,
    write_claims,
)
from testbed.experiments.stats import MIN_SEEDS, holm, ols_slope, reason, sign_test, t_interval, verdict

KEYS = {"multistage:dp": ("multistage", "dp"), "multistage:random": ("multistage", "random"),
        "split": ("split", "best-pair")}
T_VALUES, E_VALUES = (1.0, 2.0, 3.0, 4.0), (50.0, 200.0)


def sweep(seeds, q, t_values=T_VALUES, e_values=E_VALUES):
    """Rows of a synthetic sweep; q(key, t, e, seed) -> (ms_ssim or None, t_tran, t_cmp)."""
    rows = []
    for key, (method, strategy) in KEYS.items():
        for t in t_values:
            for e in e_values:
                for seed in seeds:
                    quality, tt, tc = q(key, t, e, seed)
                    rows.append({"method": method, "strategy": strategy, "t_max_s": t, "e_max_j": e, "seed": seed,
                                 "ms_ssim": quality, "feasible": 0 if quality is None else 1, "t_tran_s": tt,
                                 "t_cmp_s": tc})
    return rows


def noise(key, t, e, seed, scale=0.01):
    """Deterministic per-run noise."""
    rng = np.random.default_rng(zlib.crc32(repr((key, t, e, seed)).encode()))
    return float(rng.normal(0, scale))


def paper(key, t, e, seed):
    """The paper's picture: w/ DS > w/o DS > split, quality rising with T_max, multi-stage's
    transmission share falling with T_max, split's high."""
    n = noise(key, t, e, seed)
    if key == "split":
        return 0.1 + 0.05 * t + n, 0.8 * t, 0.2 * t
    base = 0.5 + 0.05 * t if key == "multistage:dp" else 0.42 + 0.04 * t
    return base + n, 0.3 / t + abs(n), 0.7


def reversed_paper(key, t, e, seed):
    """Everything the other way round."""
    n = noise(key, t, e, seed)
    if key == "split":
        return 0.9 + n, 0.1, 0.9  # better than multi-stage, compute-bound
    base = 0.7 - 0.05 * t if key == "multistage:dp" else 0.8 - 0.04 * t
    return base + n, 0.1 * t, 0.7


def by_id(claims):
    return {c["id"]: c for c in claims}


def test_clearly_holds_with_ten_seeds():
    claims = by_id(evaluate_claims(sweep(range(1, 11), paper)))
    assert [claims[i]["verdict"] for i in (1, 2, 3, 4)] == ["holds"] * 4
    c1 = claims[1]
    assert c1["unit"] == "seed" and c1["n_seeds"] == 10
    assert (c1["test"]["n"], c1["test"]["for"], c1["test"]["against"]) == (10, 10, 0)  # seeds, not (T, E) points
    assert c1["test"]["p_value"] == pytest.approx(0.5 ** 10) and c1["p_adjusted"] < 0.05
    assert c1["effect"] > 0 and 0 < c1["interval"]["low"] <= c1["effect"] <= c1["interval"]["high"]
    assert claims[3]["effect"] < 0 and claims[3]["interval"]["high"] < 0  # the share falls
    assert [p["verdict"] for p in claims[3]["parts"]] == ["holds", "holds"]
    assert claims[3]["p_adjusted"] == max(p["p_adjusted"] for p in claims[3]["parts"])
    assert "excludes 0" in reason(c1)


def test_five_agreeing_seeds_do_not_survive_holm():
    """Five seeds all on one side give p = 1/32 each; Holm across the sweep's five tests
    needs the smallest below 0.01: inconclusive, and the reason says to run more seeds."""
    claims = evaluate_claims(sweep(range(1, 6), paper))
    assert {c["verdict"] for c in claims} == {"inconclusive"} and MIN_SEEDS == 5
    c1 = by_id(claims)[1]
    assert c1["test"]["for"] == 5 and c1["p_adjusted"] == pytest.approx(5 / 32)
    assert "run more seeds" in reason(c1, 5)


def test_clearly_fails_when_reversed():
    claims = by_id(evaluate_claims(sweep(range(1, 11), reversed_paper)))
    assert [claims[i]["verdict"] for i in (1, 2, 3, 4)] == ["does not hold"] * 4
    assert claims[1]["test"]["p_against_adjusted"] < 0.05 and claims[1]["interval"]["high"] < 0
    assert claims[2]["conditions"][0]["holds"] is False and claims[2]["conditions"][0]["failed_at"]


def test_in_between_is_inconclusive():
    """w/ DS equals w/o DS except in two seeds: never below, never significantly above."""

    def q(key, t, e, seed):
        quality, tt, tc = paper(key, t, e, seed)
        if key == "multistage:random":
            same, _, _ = paper("multistage:dp", t, e, seed)
            return same - (0.02 if (t, e, seed) in {(1.0, 50.0, 1), (4.0, 200.0, 3)} else 0.0), tt, tc
        return quality, tt, tc

    c2 = by_id(evaluate_claims(sweep(range(1, 11), q)))[2]
    assert c2["test"]["for"] == 2 and c2["test"]["ties"] == 8 and c2["conditions"][0]["holds"]
    assert c2["verdict"] == "inconclusive" and "not below 0.05" in reason(c2)


def test_three_seeds_are_inconclusive_however_clear_and_say_why():
    claims = evaluate_claims(sweep([1, 2, 3], paper))
    assert {c["verdict"] for c in claims} == {"inconclusive"}
    assert all(c["test"]["for"] == 3 == c["n_seeds"] for c in claims if "parts" not in c)
    why = reason(claims[0])
    assert "3 seeds" in why and f"at least {MIN_SEEDS}" in why and "0.125" in why
    assert "3 seeds: a verdict needs at least 5" in claims_text(claims, width=400)  # unwrapped: one line per row
    assert max(len(line) for line in claims_text(claims).splitlines()) <= 120  # wraps inside its cells


def test_claim2_needs_every_budget_point():
    """Favoured overall, but below w/o DS on average at one point: does not hold, and says where."""

    def q(key, t, e, seed):
        quality, tt, tc = paper(key, t, e, seed)
        if key == "multistage:dp" and (t, e) == (4.0, 50.0):
            return quality - 0.2, tt, tc
        return quality, tt, tc

    c2 = by_id(evaluate_claims(sweep(range(1, 11), q)))[2]
    assert c2["p_adjusted"] < 0.05 and c2["interval"]["low"] > 0
    assert c2["verdict"] == "does not hold"
    failed = c2["conditions"][0]["failed_at"]
    assert len(failed) == 1 and failed[0].startswith("T_max 4 s, E_max 50 J")
    assert f"fails at {failed[0]}" in claims_markdown([c2])  # the table says why


def test_claim3_is_a_trend_over_every_tmax_not_the_endpoints():
    """Share lower at the last T_max than at the first, but rising over the middle: the
    endpoints would say 'falls', each seed's slope over every T_max says it rises."""
    shares = {1.0: 0.30, 2.0: 0.45, 3.0: 0.50, 4.0: 0.29}

    def q(key, t, e, seed):
        quality, tt, tc = paper(key, t, e, seed)
        if key == "multistage:dp":
            s = shares[t] + noise(key, t, e, seed, 0.001)
            return quality, s, 1 - s
        return quality, tt, tc

    c3 = by_id(evaluate_claims(sweep(range(1, 11), q)))[3]
    trend = c3["parts"][0]
    assert trend["test"]["n"] == 10 and trend["effect"] > 0
    assert trend["verdict"] == "does not hold" and c3["verdict"] == "does not hold"


def test_missing_runs_are_inconclusive_with_a_note():
    rows = [r for r in sweep(range(1, 11), paper) if r["method"] == "split"]
    claims = by_id(evaluate_claims(rows))
    assert claims[1]["verdict"] == claims[2]["verdict"] == claims[4]["verdict"] == "inconclusive"
    assert "no paired" in claims[1]["note"] and claims[1]["effect"] is None and claims[1]["interval"] is None
    assert claims[1]["n_seeds"] == 0 and "0 seeds" in reason(claims[1])


def test_claims_json_verdicts_follow_from_its_statistics(tmp_path):
    for q in (paper, reversed_paper):
        doc = write_claims(sweep(range(1, 11), q), tmp_path / "claims.json", {"commit": "abc"})
        back = json.loads((tmp_path / "claims.json").read_text())
        assert back == json.loads(json.dumps(doc))
        assert [c["id"] for c in back["claims"]] == [1, 2, 3, 4]
        for c in back["claims"]:
            assert {"id", "statement", "verdict", "n_seeds", "effect", "interval", "test", "unit", "p_adjusted"} <= set(c)
            assert c["unit"] == "seed" and c["verdict"] in ("holds", "does not hold", "inconclusive")
            assert verdict(c) == c["verdict"]  # recomputed from the file's own numbers
        assert back["claims"][0]["statement"] == CLAIMS[1] and "sign test" in back["rule"] and "Holm" in back["rule"]


def test_markdown_lists_every_claim_and_part():
    table = claims_markdown(claims_doc(sweep(range(1, 11), paper))["claims"])
    lines = table.splitlines()
    assert [ln.split(" | ")[0] for ln in lines[2:]] == ["| 1", "| 2", "| 3", "| 3a", "| 3b", "| 4"]
    assert "**holds**" in lines[2] and "10 / 0 / 0" in lines[2]


def test_terminal_table_has_every_verdict_and_its_reason():
    from rich.table import Table

    claims = evaluate_claims(sweep(range(1, 11), reversed_paper))
    table = claims_table(claims)
    assert isinstance(table, Table) and table.row_count == 6
    text = claims_text(claims, width=400)
    assert "|" not in text and "**" not in text  # a table for people, not markdown
    rows = [line for line in text.splitlines() if line.startswith("│ ") and line.split("│")[1].strip()]
    assert [r.split("│")[1].strip() for r in rows] == ["1", "2", "3", "3a", "3b", "4"]
    for c in claims:
        assert c["verdict"] in next(r for r in rows if r.split("│")[1].strip() == str(c["id"]))
    assert "does not reach past 0 on the claimed side" in text and "fails at" in text


# -- the statistics themselves -----------------------------------------------------------------

def test_sign_test_is_exact_and_drops_ties():
    t = sign_test([0.1] * 5, "greater")
    assert t["p_value"] == pytest.approx(1 / 32) and t["p_against"] == 1.0
    t = sign_test([0.1, -0.2, 0.0, 0.3], "less")
    assert (t["for"], t["against"], t["ties"], t["n"]) == (1, 2, 1, 3)
    assert sign_test([], "greater")["p_value"] == 1.0
    with pytest.raises(ValueError):
        sign_test([1.0], "bigger")


def test_t_interval_is_student_and_covers_at_five_seeds():
    assert t_interval([1.0]) is None
    low, high = t_interval([1.0, 2.0, 3.0])
    assert (low + high) / 2 == pytest.approx(2.0) and (high - low) / 2 == pytest.approx(4.302653 / 3 ** 0.5)
    rng = np.random.default_rng(0)
    covered = sum(lo <= 0.3 <= hi for lo, hi in (t_interval(rng.normal(0.3, 1.0, 5)) for _ in range(4000)))
    assert 0.93 < covered / 4000 < 0.97  # a percentile bootstrap of 5 numbers covers ~0.8


def test_holm_step_down():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0]) and holm([]) == []


def test_slope():
    assert ols_slope([1, 2, 4], [3, 5, 9]) == pytest.approx(2.0)
    assert ols_slope([2, 2], [1, 5]) is None


def _doc(p, p_against, low, high, n_seeds=5, alternative="greater", conditions=()):
    return {"n_seeds": n_seeds, "interval": {"low": low, "high": high}, "p_adjusted": p,
            "test": {"alternative": alternative, "p_value": p / 2, "p_against": p_against / 2,
                     "p_against_adjusted": p_against, "n": n_seeds, "for": n_seeds, "against": 0},
            "conditions": [{"holds": c, "what": "x", "failed_at": ["y"]} for c in conditions]}


@pytest.mark.parametrize("doc, want", [
    (_doc(0.01, 1.0, 0.1, 0.3), "holds"),
    (_doc(0.01, 1.0, -0.3, -0.1, alternative="less"), "holds"),
    (_doc(0.01, 1.0, 0.0, 0.3), "inconclusive"),  # the interval touches zero
    (_doc(0.2, 0.6, 0.1, 0.3), "inconclusive"),  # the sign test is not convinced
    (_doc(1.0, 0.01, -0.3, -0.1), "does not hold"),
    (_doc(0.5, 0.5, 0.0, 0.0), "does not hold"),  # all ties: no effect at all
    (_doc(0.01, 1.0, 0.1, 0.3, conditions=(True, False)), "does not hold"),
    (_doc(0.01, 1.0, 0.1, 0.3, n_seeds=4), "inconclusive"),  # holds needs five seeds
    (_doc(1.0, 0.01, -0.3, -0.1, n_seeds=4), "inconclusive"),
    (_doc(0.04, 1.0, 0.1, 0.3) | {"p_adjusted": 0.06}, "inconclusive"),  # the adjusted p decides, not the raw
])
def test_verdict_rule(doc, want):
    assert verdict(doc) == want
    assert reason(doc)  # every verdict says why


def test_a_claim_of_parts_holds_only_when_all_do():
    holds, fails, unsure = _doc(0.01, 1.0, 0.1, 0.3), _doc(1.0, 0.01, -0.3, -0.1), _doc(0.2, 0.6, 0.1, 0.3)
    assert verdict({"parts": [holds, holds]}) == "holds"
    assert verdict({"parts": [holds, unsure]}) == "inconclusive"
    assert verdict({"parts": [unsure, fails]}) == "does not hold"
