"""SD1.5 prompts: `testbed generate --model sd15 --prompt ...` offline from a local snapshot.

A miniature SD pipeline (random weights) with a real CLIP tokenizer built from a tiny BPE
vocabulary and a small CLIP text model is saved as a Hugging Face cache snapshot of SD1.5's
repository under a temporary HF_HUB_CACHE; the command runs in its own process, offline, as a
user runs it. Without `transformers` (the `[sd15]` extra) the error names the extra.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mini_sd import save_mini_sd
from testbed.diffusion import generate, load_model
from testbed.diffusion.models import SD15_REPO_IDS, torch_threads
from testbed.errors import ResourceError

REVISION = "0" * 40


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """An HF hub cache holding a snapshot of SD1.5's repository id (what `--model sd15` resolves)."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / ("models--" + SD15_REPO_IDS[0].replace("/", "--"))
    save_mini_sd(repo / "snapshots" / REVISION, text_encoder=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return cache


@pytest.mark.slow  # (make check leaves it to make test: seconds of CPU)
def test_generate_sd15_reads_the_prompt(hub_cache, tmp_path):
    out = tmp_path / "cat.png"
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "testbed.cli", "generate", "--model", "sd15", "--prompt",
                        "a photo of a red cat", "--steps", "3", "--seed", "4", "--out", str(out), "--json"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["model"] == "sd15" and doc["steps"] == 3
    from PIL import Image

    img = np.asarray(Image.open(out))
    assert img.shape == (16, 16, 3)
    snapshot = hub_cache / ("models--" + SD15_REPO_IDS[0].replace("/", "--")) / "snapshots" / REVISION
    with torch_threads(1):
        m = load_model(str(snapshot), "fp32")
        assert type(m.tokenizer).__name__ == "CLIPTokenizer"
        assert m.tokenizer.convert_ids_to_tokens(m.tokenizer("red cat").input_ids)[1:3] == ["red</w>", "cat</w>"]
        same = generate(m, "a photo of a red cat", 4, 3)
        other = generate(m, "a white background", 4, 3)
    assert np.array_equal(img, same)  # what the command wrote is this prompt's image
    assert not np.array_equal(same, other)  # and the prompt changes it


def test_without_transformers_the_error_names_the_extra(hub_cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    snapshot = hub_cache / ("models--" + SD15_REPO_IDS[0].replace("/", "--")) / "snapshots" / REVISION
    m = load_model(str(snapshot), "fp32")
    with pytest.raises(ResourceError, match=r"pip install -e '\.\[sd15\]'"):
        generate(m, "a red cat", 0, 1)
