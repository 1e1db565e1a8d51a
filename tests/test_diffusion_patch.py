"""Patch parallelism's math (diffusion/patch.py), in one process: the bands computed with
fresh context are the unbroken UNet, each band computes only its rows plus a halo, and
displaced context is the previous step's."""

from __future__ import annotations

import copy

import pytest
import torch

from testbed.diffusion.patch import (
    DisplacedExchange,
    PatchLayout,
    PatchPredictor,
    PatchUNet,
    receivers,
    routed_bytes,
    run_patch,
    run_synchronously,
    valid_patch_counts,
)
from testbed.errors import WorkloadError


def _cross_attention_unet():
    """Like the 32x32 embedded model: cross- and self-attention (Transformer2DModel),
    pooled text added to the time embedding, three levels."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=12, out_channels=12, layers_per_block=1, block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
        attention_head_dim=4, norm_num_groups=16, class_embed_type="projection",
        projection_class_embeddings_input_dim=64)
    kw = {"encoder_hidden_states": torch.randn(2, 7, 64), "class_labels": torch.randn(2, 64)}
    return unet.eval(), torch.randn(2, 12, 16, 16), kw


def _attention_unet():
    """Like the digits model: UNet2DModel with attention blocks (group norm inside)."""
    from diffusers import UNet2DModel

    torch.manual_seed(1)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8, attention_head_dim=32, num_class_embeds=11)
    return unet.eval(), torch.randn(2, 1, 8, 8), {"class_labels": torch.tensor([10, 3])}


@pytest.mark.parametrize("make", [_cross_attention_unet, _attention_unet], ids=["cross-attention", "attention"])
@pytest.mark.parametrize("n", [2, 4])
def test_synchronous_bands_are_the_unbroken_unet(make, n):
    unet, x, kw = make()
    t = torch.tensor(500)
    with torch.inference_mode():
        ref = unet(x, t, **kw).sample
    punet = PatchUNet(unet)
    outs, _ = run_synchronously(punet, x, t, kw, PatchLayout(x.shape[-2], n))
    assert float((torch.cat(outs, dim=-2) - ref).abs().max()) < 1e-5 * float(ref.abs().max())


def test_each_band_computes_its_rows_and_a_halo_only():
    unet, x, kw = _cross_attention_unet()
    punet = PatchUNet(unet)
    layout = PatchLayout(16, 4)
    rows_seen: dict[str, set[int]] = {}

    def seen(name):
        return lambda mod, args: rows_seen.setdefault(name, set()).add(args[0].shape[-2])

    hooks = [m.register_forward_pre_hook(seen(name)) for name, m in punet.unet.named_modules()
             if isinstance(m, torch.nn.Conv2d)]
    try:
        run_synchronously(punet, x, torch.tensor(500), kw, layout)
    finally:
        for h in hooks:
            h.remove()
    assert punet.input_halo == (1, 1)
    assert rows_seen["conv_in.conv"] == {4 + 2}  # the UNet input: the band's 4 rows + 1 above + 1 below
    for name, rows in rows_seen.items():
        assert max(rows) <= 4 + 2, name  # no layer ever sees more than its band and a 1-row halo each side
    # each band gives its attention inputs, GroupNorm statistics and boundary rows: less
    # than the whole latent's activations, and the edge bands have one neighbour only
    up, down = routed_bytes(run_synchronously(punet, x, torch.tensor(500), kw, layout)[1], 4)
    assert up[0] < up[1] == up[2] and up[3] < up[2] and all(d > 0 for d in down)


@pytest.mark.slow  # (make check leaves it to make test: seconds of CPU)
def test_displaced_context_is_the_previous_steps():
    """With the same input twice, the previous step's context is this step's: displaced
    then equals synchronous; with another input it does not."""
    unet, x, kw = _cross_attention_unet()
    t = torch.tensor(500)
    with torch.inference_mode():
        ref = unet(x, t, **kw).sample
    predict = PatchPredictor(unet, PatchLayout(16, 2), warmup_steps=1)
    predict(x, t, kw)  # synchronous: fills the context
    again = predict(x, t, kw)  # displaced, with the previous (identical) step's context
    assert predict.record.modes == ["sync", "displaced"]
    assert float((again - ref).abs().max()) < 1e-5 * float(ref.abs().max())
    other = x + 0.3 * torch.randn_like(x)
    with torch.inference_mode():
        ref_other = unet(other, t, **kw).sample
    stale = predict(other, t, kw)  # the context is the previous input's
    assert float((stale - ref_other).abs().max()) > 1e-3


def test_a_displaced_step_needs_a_previous_step():
    unet, x, kw = _attention_unet()
    punet = PatchUNet(unet)
    layout = PatchLayout(8, 2)
    with pytest.raises(WorkloadError, match="warm-up"):
        punet.forward(layout.extend(x, 0, punet.input_halo), torch.tensor(10), kw, 0, layout,
                      DisplacedExchange(0, {}))


@pytest.mark.slow  # (make check leaves it to make test: seconds of CPU)
@pytest.mark.parametrize("n", [2, 4])
def test_synchronous_generation_equals_the_unbroken_run_on_the_embedded_model(n):
    from testbed.diffusion import encode_prompt, initial_latent, load_model, run_stage

    model = load_model("tiny", "fp32")
    lat, cond = initial_latent(model, 3), encode_prompt(model, "a handwritten 2")
    ref, _ = run_stage(model, lat, cond, 0, 8, 8, "ddim")
    x, rec = run_patch(model, lat, cond, 8, n, warmup_steps=8)
    assert float((x - ref).abs().max()) < 1e-4
    assert rec.modes == ["sync"] * 8 and rec.halo == (1, 1)
    shown, _ = run_patch(model, lat, cond, 8, n, warmup_steps=1)
    assert rec.n == n and float((shown - ref).abs().max()) > 1e-4  # displaced: not the unbroken run


@pytest.mark.slow  # (make check leaves it to make test: seconds of CPU)
def test_quantized_and_half_precision_variants_patch_too():
    from testbed.diffusion.quantize import make_variant

    unet, x, kw = _cross_attention_unet()
    t = torch.tensor(300)
    for precision, tol in (("int8", 1e-5), ("fp16", 2e-2)):  # fp16 = bf16 on a CPU: its own rounding
        v = make_variant(copy.deepcopy(unet), precision)
        with torch.inference_mode():
            ref = v(x, t, **kw).sample
        outs, _ = run_synchronously(PatchUNet(v), x, t, kw, PatchLayout(16, 2))
        assert float((torch.cat(outs, dim=-2) - ref).abs().max()) < tol * float(ref.abs().max()), precision


def test_layouts_say_what_fits():
    from testbed.diffusion import load_model

    tiny = load_model("tiny", "fp32").unet
    assert valid_patch_counts(tiny, 16, 16) == [2, 4]  # 16 rows, two 2x downsamplings: bands of 8 or 4 rows
    unet = load_model("digits", "fp32").unet
    assert valid_patch_counts(unet, 8, 8) == [2, 4]  # 8 rows, one 2x downsampling: bands of 4 or 2 rows
    assert PatchLayout(8, 4).rows(2) == (4, 6)
    with pytest.raises(WorkloadError, match="equal bands"):
        PatchLayout(8, 3)
    with pytest.raises(WorkloadError, match="downsampling"):
        PatchLayout(8, 8).check(unet)


def test_parts_go_to_the_neighbours_or_to_everyone():
    assert receivers("top", 0, 3) == [] and receivers("top", 2, 3) == [1]
    assert receivers("bottom", 2, 3) == [] and receivers("bottom", 0, 3) == [1]
    assert receivers("all", 1, 3) == [0, 2]
    with pytest.raises(WorkloadError):
        receivers("left", 0, 2)
    one = torch.zeros(10)  # 40 bytes
    up, down = routed_bytes({"p": [{"top": one, "bottom": one, "all": one}] * 3}, 3)
    assert up == [80, 120, 80] and down == [120, 160, 120]
