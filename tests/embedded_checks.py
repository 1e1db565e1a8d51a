"""What the embedded models' test files share: their autouse fixtures (imported by name, so pytest
finds them in each file) and the checks both models must pass."""

from __future__ import annotations

import numpy as np
import pytest

from testbed.diffusion import decode, encode_prompt, initial_latent, reference_image, run_split, run_stage
from testbed.diffusion.models import torch_threads


@pytest.fixture(autouse=True)
def reference_cache(tmp_path_factory, monkeypatch):
    """References (fp32, 50 steps) are cached in the session's temporary directory, not ~/.cache."""
    monkeypatch.setenv("TESTBED_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "tb-cache"))


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    with torch_threads(1):  # the machine's 2 cores are shared: more threads spin
        yield


def check_quality_order(score: dict[str, float], by_steps: dict[int, float], tol: float, int4_gap: float) -> None:
    """fp32 >= bf16 >= int8 >= int4 with neighbours tying within `tol`, int4 more than `int4_gap`
    below fp32 (so the check can fail), and 5 < 20 < 50 (= reference) steps."""
    assert score["fp32"] + tol >= score["fp16"] and score["fp16"] + tol >= score["int8"], score
    assert score["int8"] + tol >= score["int4"], score
    assert score["fp32"] - score["int4"] > int4_gap, score
    assert by_steps[5] < by_steps[20] < score["fp32"], (by_steps, score["fp32"])


def check_split_and_stages_reproduce_the_reference(model, prompt: str, seed: int) -> None:
    """Five chained 10-step stages and the split run both give the reference image exactly."""
    n = model.reference_steps
    ref = reference_image(model.name, prompt, seed)
    lat, cond = initial_latent(model, seed), encode_prompt(model, prompt)
    x, state = lat, None
    for a in range(0, n, 10):
        x, state = run_stage(model, x, cond, a, a + 10, n, "ddim", state)
    split, info = run_split(model, lat, cond, n, "ddim")
    assert (split - x).abs().max().item() < 1e-5
    assert np.array_equal(decode(model, x), ref) and np.array_equal(decode(model, split), ref)
    assert info["bytes_per_step"] > 0
