"""How large split's messages are (SD1.5's cut tensors), kept import-light: the method
registry sizes the broker from `largest_message_bytes`, and split's plan prices a head's
features from `feature_bytes_fn`, without building a UNet."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["feature_bytes_fn", "largest_message_bytes", "FEATURE_BYTES_FP32"]

#: One step's cut tensors with an fp32 head (CFG batch 2), by resolution: what
#: `diffusion.split.sd15_split_bytes_per_step(px, 4)` counts on the meta device (tens of
#: seconds: it builds SD1.5's UNet; tests/test_split_sizes.py checks these), kept here so
#: that a plan or a broker's size does not wait for it.
FEATURE_BYTES_FP32 = {256: 13_918_208, 512: 54_222_848}


def feature_bytes_fn(resolution_px: int) -> Callable[[str], int]:
    """Wire size of one step's cut tensors for a head of a given precision (SD1.5's shapes).

    The cut tensors are activations: their count depends on the resolution alone and each
    takes the head's activation size (4 bytes for fp32, 2 for the others,
    selection/costs.py activation_bytes), so a head's bytes are FEATURE_BYTES_FP32 x
    activation_bytes / 4. A resolution without a tabled count is counted on the meta device."""
    from testbed.selection.costs import activation_bytes

    fp32 = FEATURE_BYTES_FP32.get(resolution_px)
    if fp32 is None:
        from testbed.diffusion.split import sd15_split_bytes_per_step

        return lambda precision: sd15_split_bytes_per_step(resolution_px, activation_bytes(precision), 2)
    return lambda precision: fp32 * activation_bytes(precision) // 4


def largest_message_bytes(resolution_px: int) -> int:
    """The largest message a split run sends at this resolution."""
    return FEATURE_BYTES_FP32[resolution_px]
