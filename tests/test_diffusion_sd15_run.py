"""A scenario with `model: sd15` runs offline from a local snapshot: topologies/small.yaml with
SD1.5's model name and a text prompt, over the emulated cell (root, mosquitto), where the model
is the miniature SD pipeline with a real CLIP tokenizer and text encoder in a temporary Hugging
Face cache. The server encodes the prompt with CLIP; the agents run their stages on it."""

from __future__ import annotations

import pytest

from mini_sd import save_mini_sd
from testbed.diffusion.models import SD15_REPO_IDS
from testbed.model.topology import load_topology

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.mosquitto]


async def test_a_scenario_with_model_sd15_runs_from_the_local_snapshot(topologies, tmp_path, unique_run_id,
                                                                        monkeypatch):
    import huggingface_hub.constants

    from testbed.composition.cells import MadeCell
    from testbed.composition.session import RunSession

    cache = tmp_path / "hub"
    repo = cache / ("models--" + SD15_REPO_IDS[0].replace("/", "--"))
    save_mini_sd(repo / "snapshots" / ("0" * 40), text_encoder=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # the agents' processes
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TESTBED_CACHE_DIR", str(tmp_path / "tb-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # this process imported it already
    topo = load_topology(topologies / "small.yaml")
    topo = topo.model_copy(update={"workload": topo.workload.model_copy(
        update={"model": "sd15", "prompt": "a photo of a red cat on a white background"})})
    async with RunSession(topo, MadeCell(unique_run_id[:7]), out_dir=tmp_path / "out") as r:
        res = await r.run()
    doc = res.to_json()
    assert doc["meta"]["model"] == "sd15" and doc["recovered"] == []
    assert doc["total_steps"] == topo.workload.steps_per_stage * len(doc["selected"]) > 0
    assert 0 < doc["ms_ssim"] <= 1 and (tmp_path / "out" / "image.png").stat().st_size > 0
