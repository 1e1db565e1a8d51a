"""Acceptance tests of the embedded digits model (8x8, scikit-learn digits): recognisable, not memorised, quality vs precision/steps,
split and multi-stage runs reproduce the reference, and the `generate` command.

Quality vs precision is measured on the reference's own schedule (50 DDIM steps), so the only
difference from the reference is the variant; a tolerance of 0.01 mean MS-SSIM over 10 seeds
lets neighbours tie (measured: fp32 1.000, bf16 0.999, int8 0.971, int4 0.844 — bf16 differs
from fp32 by under 0.001, less than the 0.01 spread between seeds of one variant), while int4
must fall clearly (> 0.05) below fp32 so that the test can fail. Steps: 5 < 20 < 50 (=ref).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from testbed.diffusion import (
    PRECISIONS,
    decode,
    encode_prompt,
    initial_latent,
    load_model,
    ms_ssim,
    parse_digit_prompt,
    reference_image,
    run_split,
    run_stage,
    variant_sizes_bytes,
)

from embedded_checks import (  # noqa: F401 - autouse fixtures
    check_quality_order,
    check_split_and_stages_reproduce_the_reference,
    one_torch_thread,
    reference_cache,
)
from testbed.errors import InputError

SEEDS = list(range(10))
STEPS = 20


@pytest.fixture(scope="module")
def fp32():
    return load_model("digits", "fp32")


def _batch(model, prompt, seeds, steps, kind="ddim"):
    lat = torch.cat([initial_latent(model, s) for s in seeds])
    x, _ = run_stage(model, lat, encode_prompt(model, prompt), 0, steps, steps, kind)
    return x, decode(model, x)


def _to_digits_space(imgs: np.ndarray) -> np.ndarray:
    """32x32 uint8 images -> 8x8 in the data set's 0..16 scale (area average)."""
    x = imgs.astype(np.float64).reshape(len(imgs), 8, 4, 8, 4).mean(axis=(2, 4))
    return (x / 255.0 * 16.0).reshape(len(imgs), 64)


@pytest.mark.slow  # (make check leaves it to make test: seconds of CPU)
def test_samples_are_recognisable_and_not_copies(fp32):
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    d = load_digits()
    clf = SVC(gamma=0.001).fit(d.data, d.target)
    hits, samples = 0, []
    for digit in range(10):
        _, imgs = _batch(fp32, f"a handwritten {digit}", [100 + digit * 7 + i for i in range(5)], STEPS)
        feats = _to_digits_space(imgs)
        hits += int((clf.predict(feats) == digit).sum())
        samples.append(feats)
    assert hits / 50 >= 0.80, f"only {hits}/50 samples classified as the prompted digit"
    s = np.concatenate(samples)
    train = d.data.astype(np.float64)
    nn_sample = np.sqrt(((s[:, None, :] - train[None]) ** 2).sum(-1)).min(1)
    dist_tt = np.sqrt(((train[:300, None, :] - train[None]) ** 2).sum(-1))
    dist_tt[np.arange(300), np.arange(300)] = np.inf
    nn_train = dist_tt.min(1)
    # no sample is a copy: each is farther from its nearest training image than a quarter of
    # the typical training-to-training nearest-neighbour distance
    assert nn_sample.min() > 0.25 * np.median(nn_train), (nn_sample.min(), np.median(nn_train))


@pytest.mark.slow  # (make check leaves it to make test: seconds of CPU)
def test_quality_falls_with_precision_and_rises_with_steps(fp32):
    prompt, n = "a handwritten 4", fp32.reference_steps
    refs = [reference_image("digits", prompt, s) for s in SEEDS]
    score = {}
    for p in PRECISIONS:
        m = fp32 if p == "fp32" else load_model("digits", p)
        _, imgs = _batch(m, prompt, SEEDS, n)
        score[p] = float(np.mean([ms_ssim(i, r) for i, r in zip(imgs, refs)]))
    by_steps = {k: float(np.mean([ms_ssim(i, r) for i, r in zip(_batch(fp32, prompt, SEEDS, k)[1], refs)]))
                for k in (5, 20)}
    check_quality_order(score, by_steps, tol=0.01, int4_gap=0.05)


def test_split_and_multistage_reproduce_the_reference(fp32):
    check_split_and_stages_reproduce_the_reference(fp32, "a handwritten 2", 11)


def test_variant_sizes_shrink_and_prompts_parse():
    sizes = variant_sizes_bytes("digits")
    assert sizes["fp32"] > sizes["fp16"] > sizes["int8"] > sizes["int4"]
    assert sizes["fp16"] < 0.51 * sizes["fp32"]
    assert sizes["int8"] < 0.3 * sizes["fp32"]
    assert parse_digit_prompt("a handwritten 7") == 7 and parse_digit_prompt("Seven!") == 7
    for bad in ("a cat", "a 3 and a 5", "42"):
        with pytest.raises(InputError, match="prompt"):
            parse_digit_prompt(bad)


def test_generate_cli_writes_the_image_alone(tmp_path, fp32):
    from PIL import Image
    from typer.testing import CliRunner

    from testbed.cli import app

    out = tmp_path / "seven.png"
    r = CliRunner().invoke(app, ["generate", "--model", "digits", "--prompt", "a handwritten 7", "--steps", "10",
                                 "--seed", "3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    img = np.asarray(Image.open(out))
    assert img.shape == (32, 32) and img.dtype == np.uint8
    lat, _ = run_stage(fp32, initial_latent(fp32, 3), encode_prompt(fp32, "a handwritten 7"), 0, 10, 10)
    assert np.array_equal(img, decode(fp32, lat))
    bad = CliRunner().invoke(app, ["generate", "--model", "digits", "--prompt", "a cat", "--out", str(tmp_path / "x.png")])
    assert bad.exit_code != 0 and not (tmp_path / "x.png").exists()


def test_training_is_deterministic(tmp_path):
    from testbed.diffusion import train_digits

    a = train_digits(tmp_path / "a.safetensors", steps=3, batch=8, log=None)
    b = train_digits(tmp_path / "b.safetensors", steps=3, batch=8, log=None)
    from safetensors.torch import load_file

    ta, tb = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert a["loss"] == b["loss"] and a["params"] == 702753
