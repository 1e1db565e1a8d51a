"""How well predicted transfer-time distributions fit measured transfers. Pure.

Two checks of issue 23, on a set of measured transfers each with its predicted
distribution (stochastic.py):

- bias: sum(measured) / sum(predicted means) - 1, with a 95 % bootstrap interval that
  resamples whole runs (transfers of one run share the host's load at that moment);
- calibration: the share of transfers inside their predicted p10-p90 (0.8 if the model is
  right) and below their predicted p50 (0.5), with Wilson intervals.

`pass_rate` answers the question to ask before chasing acceptance numbers on a random
process: how often would a *correct* model pass them with these very transfers? It draws
every "measurement" from its own predicted distribution and applies the same checks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from testbed.selection.stochastic import Distribution

__all__ = ["ACCEPTANCE", "Transfer", "bias", "calibration", "passes", "pass_rate", "wilson"]

#: Issue 23's acceptance: |bias| <= 10 % with its interval containing 0 (measured/predicted
#: containing 1); 72-88 % inside p10-p90; 40-60 % below p50.
ACCEPTANCE = {"bias_max": 0.10, "inside_low": 0.72, "inside_high": 0.88, "below_low": 0.40, "below_high": 0.60}
RESAMPLES = 2000


@dataclass(frozen=True)
class Transfer:
    """One measured transfer (seconds) and the distribution predicted for it."""

    measured_s: float
    predicted: Distribution
    cluster: str = ""  # transfers with one cluster (a run) are resampled together
    group: str = ""  # e.g. the link's delay and loss


def _arrays(transfers: Sequence[Transfer]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    measured = np.array([t.measured_s for t in transfers], float)
    mean = np.array([t.predicted.mean() for t in transfers], float)
    q = np.array([t.predicted.quantile([0.1, 0.5, 0.9]) for t in transfers], float).reshape(-1, 3)
    _, cluster = np.unique([t.cluster for t in transfers], return_inverse=True)
    return measured, mean, q, cluster, np.array([t.predicted.samples for t in transfers])


def _bias_interval(measured: np.ndarray, mean: np.ndarray, cluster: np.ndarray, rng: np.random.Generator,
                   resamples: int) -> tuple[float, float]:
    n_c = int(cluster.max()) + 1
    m_c = np.bincount(cluster, measured, n_c)
    p_c = np.bincount(cluster, mean, n_c)
    pick = rng.integers(0, n_c, size=(resamples, n_c))
    ratio = m_c[pick].sum(1) / p_c[pick].sum(1) - 1
    low, high = np.percentile(ratio, [2.5, 97.5])
    return float(low), float(high)


def bias(transfers: Sequence[Transfer], resamples: int = RESAMPLES, seed: int = 0) -> dict[str, float]:
    """mean measured / mean predicted - 1, with its 95 % run-bootstrap interval."""
    if not transfers:
        raise ValueError("bias of no transfers")
    measured, mean, _, cluster, _ = _arrays(transfers)
    low, high = _bias_interval(measured, mean, cluster, np.random.default_rng(seed), resamples)
    return {"n": len(transfers), "clusters": int(cluster.max()) + 1, "measured_mean_s": float(measured.mean()),
            "predicted_mean_s": float(mean.mean()), "bias": float(measured.sum() / mean.sum() - 1),
            "low": low, "high": high}


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval (95 %) of a binomial share k / n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def calibration(transfers: Sequence[Transfer]) -> dict[str, object]:
    """Shares inside the predicted p10-p90 and below the predicted p50, with Wilson intervals."""
    measured, _, q, _, _ = _arrays(transfers)
    n = len(transfers)
    inside = int(((measured >= q[:, 0]) & (measured <= q[:, 2])).sum())
    below = int((measured < q[:, 1]).sum())
    return {"n": n, "inside_p10_p90": inside / n if n else math.nan, "inside_interval": wilson(inside, n),
            "below_p50": below / n if n else math.nan, "below_interval": wilson(below, n)}


def passes(bias_doc: dict, cal_doc: dict, rules: dict[str, float] = ACCEPTANCE) -> dict[str, bool]:
    """Each acceptance check of issue 23 on these numbers, and all of them together."""
    out = {
        "bias": abs(bias_doc["bias"]) <= rules["bias_max"] and bias_doc["low"] <= 0 <= bias_doc["high"],
        "inside_p10_p90": rules["inside_low"] <= cal_doc["inside_p10_p90"] <= rules["inside_high"],
        "below_p50": rules["below_low"] <= cal_doc["below_p50"] <= rules["below_high"],
    }
    out["all"] = all(out.values())
    return out


def pass_rate(transfers: Sequence[Transfer], replicates: int = 1000, resamples: int = 500, seed: int = 0,
              rules: dict[str, float] = ACCEPTANCE) -> dict[str, float]:
    """Share of replicates in which a correct model passes each check: every transfer's
    "measurement" is one draw of its own predicted distribution; the transfers, their
    predictions and their runs are the given ones."""
    _, mean, q, cluster, draws = _arrays(transfers)
    rng = np.random.default_rng(seed)
    n = len(transfers)
    hits = {"bias": 0, "inside_p10_p90": 0, "below_p50": 0, "all": 0}
    for _ in range(replicates):
        fake = draws[np.arange(n), rng.integers(0, draws.shape[1], n)]
        low, high = _bias_interval(fake, mean, cluster, rng, resamples)
        b = {"bias": float(fake.sum() / mean.sum() - 1), "low": low, "high": high}
        c = {"inside_p10_p90": float(((fake >= q[:, 0]) & (fake <= q[:, 2])).mean()),
             "below_p50": float((fake < q[:, 1]).mean())}
        for k, ok in passes(b, c, rules).items():
            hits[k] += ok
    return {k: v / replicates for k, v in hits.items()} | {"replicates": replicates, "transfers": n}
