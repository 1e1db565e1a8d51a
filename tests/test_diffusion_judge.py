"""The judge that reads the tiny model's images: it never saw the model's training data, it reads
digits in general (handwriting it held out, the typefaces the model learnt from), it boxes glyphs
as the UCI digits are boxed, it trains deterministically, and a missing font is a clear error.

The committed judge is read, not retrained (training takes minutes); its metadata must name the
held-out faces this code lists, so a change of faces without a new judge fails here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from embedded_checks import one_torch_thread  # noqa: F401 - autouse fixture
from testbed.diffusion.fonts import JUDGE_FACES, TRAINING_FACES, Face, face_packages, font_file
from testbed.diffusion.judge import (
    JUDGE_INPUT_PX,
    JUDGE_WEIGHTS_PATH,
    Reading,
    _rendered,
    fidelity_prompts,
    glyph_boxes,
    judge_digits,
    reads_as_prompted,
    train_judge,
    uci_digits,
)
from testbed.errors import ResourceError


def test_the_judge_never_saw_the_training_faces():
    assert not set(face_packages(JUDGE_FACES)) & set(face_packages(TRAINING_FACES))
    from safetensors import safe_open

    with safe_open(JUDGE_WEIGHTS_PATH, "pt") as f:
        meta = json.loads(f.metadata()["judge"])
    assert meta["faces"] == [f.file for f in JUDGE_FACES]
    assert JUDGE_WEIGHTS_PATH.stat().st_size < 2**20


def test_the_judge_reads_held_out_handwriting_and_the_models_typefaces():
    """UCI digits it did not train on (every third), and glyphs of the 38 faces the tiny model
    learnt from, which the judge never saw: measured 99.7 % and 97-98 %."""
    x, y = uci_digits(held_out=True)
    digit, _ = judge_digits(x)
    assert (digit == y.numpy()).mean() >= 0.97
    x, y = _rendered(600, torch.Generator().manual_seed(11), TRAINING_FACES)
    digit, _ = judge_digits(x)
    assert (digit == y.numpy()).mean() >= 0.95


def test_glyph_boxes_keep_the_aspect_at_full_height():
    mask = np.zeros((32, 32), dtype=np.float32)
    mask[8:24, 12:20] = 1.0  # 16 high, 8 wide
    mask[0, 0] = 0.2  # below the box threshold: ignored
    box = glyph_boxes(mask[None])[0, 0]
    assert box.shape == (JUDGE_INPUT_PX, JUDGE_INPUT_PX)
    cols = (box > 0.5).any(0).nonzero().flatten().tolist()
    assert (box > 0.5).any(1).all() and cols == list(range(4, 12))
    assert glyph_boxes(np.zeros((1, 32, 32))).abs().max() == 0
    blurred = glyph_boxes(mask[None], np.array([True]))[0, 0]
    assert not torch.equal(blurred, box) and (blurred - box).abs().max() < 1


def test_reads_as_prompted_and_the_fidelity_sets():
    r = Reading(digit=7, confidence=0.9, ink="yellow", background="blue")
    assert reads_as_prompted("a yellow 7 on a blue background", r) == (True, True)
    assert reads_as_prompted("a yellow 1 on a blue background", r) == (False, True)
    assert reads_as_prompted("a 7", r) == (True, False)  # white on black asked
    coloured = fidelity_prompts("coloured", 3)
    assert len(coloured) == 30
    pairs = {(p.split()[1], p.split()[5]) for p, _ in coloured}
    assert len(pairs) == 30  # every ink/background pair once
    assert [p for p, _ in fidelity_prompts("white", 4)][::4] == [f"a white {d} on a black background" for d in range(10)]
    with pytest.raises(ValueError, match="kind"):
        fidelity_prompts("grey", 1)


def test_judge_training_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    a = train_judge(tmp_path / "a.safetensors", steps=2, batch=12, rendered=40, log=None)
    b = train_judge(tmp_path / "b.safetensors", steps=2, batch=12, rendered=40, log=None)
    ta, tb = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    c = train_judge(tmp_path / "c.safetensors", steps=2, batch=12, rendered=40, seed=1, log=None)
    assert a["loss"] == b["loss"] != c["loss"]


def test_a_missing_font_names_its_package(monkeypatch, tmp_path):
    import testbed.diffusion.fonts as fonts

    monkeypatch.setattr(fonts, "FONT_DIRS", (tmp_path,))
    font_file.cache_clear()
    try:
        with pytest.raises(ResourceError, match="apt-get install fonts-nowhere"):
            font_file(Face("fonts-nowhere", "Nowhere-Regular.ttf"))
    finally:
        font_file.cache_clear()


def test_the_makefile_installs_every_face():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "Makefile").read_text()
    listed = re.search(r"^FONT_PACKAGES := (.*?)(?<!\\)$", text, re.M | re.S).group(1)
    assert set(listed.replace("\\", " ").split()) == set(face_packages(TRAINING_FACES + JUDGE_FACES))
