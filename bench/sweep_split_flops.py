"""Head share of SD1.5's UNet FLOPs (CFG batch 2) at 256 and 512 px, counted on the meta
device, side by side with the constant the split plan uses (methods/split/plan.py HEAD_FLOP_SHARE).

    .venv/bin/python bench/sweep_split_flops.py
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def head_share(resolution_px: int) -> tuple[float, float, float]:
    """(head GFLOP, tail GFLOP, head share) of one CFG step at `resolution_px`."""
    from diffusers import UNet2DConditionModel

    from testbed.diffusion.split import SD15_UNET_CONFIG, SplitRunner

    side = resolution_px // 8
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        x = torch.empty(2, 4, side, side)
        ehs = torch.empty(2, 77, SD15_UNET_CONFIG["cross_attention_dim"])
    runner = SplitRunner(unet)
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            feats = runner.head(x, torch.tensor(999, device="meta"), {"encoder_hidden_states": ehs})
        head = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            runner.tail(feats)
        tail = fc.get_total_flops()
    return head / 1e9, tail / 1e9, head / (head + tail)


def main() -> None:
    from testbed.methods.split.plan import HEAD_FLOP_SHARE

    print(f"{'px':>5} {'head GFLOP':>11} {'tail GFLOP':>11} {'measured':>9} {'constant':>9} {'ratio':>6}")
    for px in (256, 512):
        h, t, share = head_share(px)
        const = HEAD_FLOP_SHARE[px]
        print(f"{px:>5} {h:>11.1f} {t:>11.1f} {share:>9.3f} {const:>9.3f} {share / const:>6.3f}")


if __name__ == "__main__":
    main()
