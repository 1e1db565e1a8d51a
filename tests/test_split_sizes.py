"""Split's feature sizes: the tabled counts are SD1.5's (meta device), and every precision's
head is priced from them without building a UNet (tests/test_run_cmd.py: no plan imports torch)."""

from __future__ import annotations

import pytest

from testbed.methods.split.sizes import FEATURE_BYTES_FP32, feature_bytes_fn, largest_message_bytes
from testbed.selection.costs import activation_bytes


def test_a_head_of_any_precision_is_priced_from_the_fp32_count():
    for px, fp32 in FEATURE_BYTES_FP32.items():
        fbytes = feature_bytes_fn(px)
        assert fbytes("fp32") == fp32 and largest_message_bytes(px) == fp32
        for precision in ("fp16", "int8", "int4"):
            assert fbytes(precision) == fp32 * activation_bytes(precision) // 4 == fp32 // 2, (px, precision)


@pytest.mark.slow
@pytest.mark.parametrize("px", [256])
def test_the_tabled_counts_are_sd15s_on_the_meta_device(px):
    """SD1.5's UNet built on the meta device, its head's outputs counted at 4 and 2 bytes
    an activation (an fp32 and an fp16 head): the table and the scaling agree with it.
    (512 px: the same code at 4x the rows; one build, ~10-20 s, is enough for the suite.)"""
    from testbed.diffusion.split import sd15_split_bytes_per_step

    assert sd15_split_bytes_per_step(px, 4, 2) == FEATURE_BYTES_FP32[px]
    assert sd15_split_bytes_per_step(px, 2, 2) == feature_bytes_fn(px)("fp16")
