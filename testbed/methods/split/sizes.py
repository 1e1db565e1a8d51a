"""How large split's messages are (SD1.5's cut tensors), kept import-light: the method
registry sizes the broker from `largest_message_bytes` without building a UNet."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["feature_bytes_fn", "largest_message_bytes", "FEATURE_BYTES_FP32"]


def feature_bytes_fn(resolution_px: int) -> Callable[[str], int]:
    """Wire size of one step's cut tensors for a head of a given precision (SD1.5's shapes)."""
    from testbed.diffusion.split import sd15_split_bytes_per_step
    from testbed.selection.costs import activation_bytes

    return lambda precision: sd15_split_bytes_per_step(resolution_px, activation_bytes(precision), 2)


#: One step's cut tensors with an fp32 head (CFG batch 2), by resolution: what
#: `feature_bytes_fn(px)("fp32")` computes on the meta device in seconds (checked by a
#: test), kept here so that sizing a broker does not have to build SD1.5's UNet.
FEATURE_BYTES_FP32 = {256: 13_918_208, 512: 54_222_848}


def largest_message_bytes(resolution_px: int) -> int:
    """The largest message a split run sends at this resolution."""
    return FEATURE_BYTES_FP32[resolution_px]
