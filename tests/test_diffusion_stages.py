"""Stage runner handoff, split runner and quantization on a miniature SD-style model (no download).

The miniature pipeline (UNet2DConditionModel + AutoencoderKL, random weights) is saved to a
temporary diffusers directory and loaded through the same offline path as SD1.5.
"""

from __future__ import annotations

import json

import pytest
import torch

from testbed.diffusion import (
    SCHEDULERS,
    SplitRunner,
    conditioning_from_embeds,
    decode,
    encode_prompt,
    initial_latent,
    load_model,
    make_scheduler,
    run_split,
    run_stage,
    variant_sizes_bytes,
)
from testbed.diffusion.quantize import QuantizedWeightLayer, dequantize_per_channel, quantize_per_channel
from testbed.diffusion.models import torch_threads
from mini_sd import save_mini_sd
from testbed.errors import InputError, WorkloadError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):  # the machine's 2 cores are shared: more threads spin
        yield


@pytest.fixture(scope="module")
def mini_sd_dir(tmp_path_factory):
    return save_mini_sd(tmp_path_factory.mktemp("mini-sd"))


@pytest.fixture(scope="module")
def mini_sd(mini_sd_dir):
    return load_model(str(mini_sd_dir), "fp32")


@pytest.fixture(scope="module")
def mini_cond():
    g = torch.Generator().manual_seed(1)
    return conditioning_from_embeds(torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g))


def plain_diffusers_loop(model, latent, cond, n, kind, g):
    """The reference: one uninterrupted loop as in diffusers' pipelines (no stage runner)."""
    sched = make_scheduler(kind, n, model)
    x = latent * sched.init_noise_sigma
    key = model.cond_keys[0]
    kw = {key: torch.cat([cond[f"uncond_{key}"], cond[key]])}
    with torch.no_grad():
        for t in sched.timesteps:
            x_in = sched.scale_model_input(torch.cat([x, x]), t)
            u, c = model.unet(x_in, t, **kw).sample.chunk(2)
            x = sched.step(u + g * (c - u), t, x).prev_sample
    return x


def _wire_roundtrip(state: dict) -> dict:
    """What the relay does: tensors through safetensors, scalars through JSON."""
    from safetensors.torch import load, save

    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    scalars = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    back = json.loads(json.dumps(scalars))
    back.update(load(save(tensors)) if tensors else {})
    return back


@pytest.mark.parametrize("kind", SCHEDULERS)
def test_chained_stages_equal_unbroken_run(mini_sd, mini_cond, kind):
    n, g = 10, 5.0
    latent = initial_latent(mini_sd, seed=3)
    whole = plain_diffusers_loop(mini_sd, latent, mini_cond, n, kind, g)
    x, state = latent, None
    for a, b in ((0, 3), (3, 4), (4, 8), (8, 10)):
        x, state = run_stage(mini_sd, x, mini_cond, a, b, n, kind, state, guidance_scale=g)
        state = _wire_roundtrip(state)
    assert (x - whole).abs().max().item() < 1e-5
    assert (x - latent).abs().max().item() > 0.1  # it did denoise


@pytest.mark.parametrize("kind", ["dpm", "pndm"])
def test_history_schedulers_need_their_state(mini_sd, mini_cond, kind):
    n, g = 10, 5.0
    latent = initial_latent(mini_sd, seed=4)
    whole, _ = run_stage(mini_sd, latent, mini_cond, 0, n, n, kind, guidance_scale=g)
    x, state = run_stage(mini_sd, latent, mini_cond, 0, 5, n, kind, guidance_scale=g)
    assert any(isinstance(v, torch.Tensor) for v in state.values())
    with pytest.raises(WorkloadError, match="keeps history"):
        run_stage(mini_sd, x, mini_cond, 5, n, n, kind, None, guidance_scale=g)
    stripped = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    stripped.update(lower_order_nums=0, counter=0)
    naive, _ = run_stage(mini_sd, x, mini_cond, 5, n, n, kind, stripped, guidance_scale=g)
    assert (naive - whole).abs().max().item() > 1e-3  # without the history the result changes


def test_state_for_the_wrong_stage_is_refused(mini_sd, mini_cond):
    x, state = run_stage(mini_sd, initial_latent(mini_sd, 0), mini_cond, 0, 2, 10, "dpm")
    with pytest.raises(WorkloadError, match="step 2 of 10"):
        run_stage(mini_sd, x, mini_cond, 3, 5, 10, "dpm", state)


def test_split_run_equals_unsplit_and_counts_bytes(mini_sd, mini_cond):
    latent = initial_latent(mini_sd, seed=5)
    whole, _ = run_stage(mini_sd, latent, mini_cond, 0, 6, 6, "ddim", guidance_scale=4.0)
    split, info = run_split(mini_sd, latent, mini_cond, 6, "ddim", guidance_scale=4.0)
    assert (split - whole).abs().max().item() < 1e-5
    runner = SplitRunner(mini_sd.unet)
    feats = runner.head(torch.cat([latent, latent]), torch.tensor(500),
                        {"encoder_hidden_states": torch.cat([mini_cond["encoder_hidden_states"]] * 2)})
    assert {"sample", "emb", "encoder_hidden_states", "skip.0"} <= set(feats)
    assert info["bytes_per_step"] == sum(t.numel() * 4 for t in feats.values())


def test_decode_and_prompt_errors(mini_sd, mini_cond):
    x, _ = run_stage(mini_sd, initial_latent(mini_sd, 0), mini_cond, 0, 2, 2)
    img = decode(mini_sd, x)
    assert img.dtype.name == "uint8" and img.shape == (16, 16, 3)
    with pytest.raises(WorkloadError, match="prompt embeddings"):
        encode_prompt(mini_sd, "a cat")


def test_quantized_layers_replace_every_conv_and_linear(mini_sd_dir):
    m8 = load_model(str(mini_sd_dir), "int8")
    assert not any(isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)) for mod in m8.unet.modules())
    q = [mod for mod in m8.unet.modules() if isinstance(mod, QuantizedWeightLayer)]
    assert {mod.kind for mod in q} == {"conv", "linear"}
    fp32 = load_model(str(mini_sd_dir), "fp32")
    n_q = sum(int(torch.tensor(mod.weight_shape).prod()) for mod in q)
    out_ch = sum(mod.weight_shape[0] for mod in q)
    # int8 = 1 byte per quantized weight + a float32 scale per output channel; the rest unchanged
    assert m8.size_bytes == fp32.size_bytes - 4 * n_q + n_q + 4 * out_ch
    sizes = variant_sizes_bytes(str(mini_sd_dir))
    assert sizes["fp32"] == fp32.size_bytes and sizes["int8"] == m8.size_bytes
    assert sizes["fp32"] > sizes["fp16"] > sizes["int8"] > sizes["int4"]
    assert sizes["fp16"] < 0.51 * sizes["fp32"]  # norms stay float32


@pytest.mark.parametrize("bits", [8, 4])
def test_per_channel_quantization_error_is_half_a_step(bits):
    w = torch.randn(6, 5, 3, 3) * torch.arange(1, 7).view(6, 1, 1, 1)
    q, scale = quantize_per_channel(w, bits)
    back = dequantize_per_channel(q, scale, bits, w.shape)
    assert ((back - w).abs().reshape(6, -1).amax(1) <= scale / 2 + 1e-6).all()
    assert q.numel() == (6 * 45 if bits == 8 else 6 * 23)  # int4: two per byte, rows padded


def test_bad_model_and_stage_range_are_clear_errors(mini_sd, mini_cond, tmp_path):
    with pytest.raises(InputError, match="unet/config.json"):
        load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(WorkloadError, match="precision 'int3'"):
        load_model(str(tmp_path), "int3")
    with pytest.raises(WorkloadError, match=r"stage \[5, 3\)"):
        run_stage(mini_sd, initial_latent(mini_sd, 0), mini_cond, 5, 3, 10)
    with pytest.raises(WorkloadError, match="scheduler 'lms'"):
        run_stage(mini_sd, initial_latent(mini_sd, 0), mini_cond, 0, 3, 10, "lms")
