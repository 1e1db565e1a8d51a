"""What the embedded models' trainers share: deterministic CPU settings, the learning-rate
schedule, the weights' moving average and the safetensors file with its metadata.

Role: keep `train-tiny` and `train-digits` reproducible in the same way (fixed seed, fixed thread
count, deterministic kernels) and save their weights in one format.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch

__all__ = ["TrainingLoop", "WeightsAverage", "deterministic_cpu", "save_weights", "warmup_cosine"]


@contextlib.contextmanager
def deterministic_cpu(seed: int, threads: int):
    """Fixed seed, thread count and kernels; the process-wide switches are restored afterwards
    (flush-to-zero would break later code that needs subnormal floats, e.g. hypothesis)."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    torch.set_flush_denormal(True)  # denormal AdamW states slow CPU kernels by 10x and more
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_flush_denormal(False)
        torch.set_num_threads(old_threads)


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, floor: float = 0.05) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over 5 % of the steps, then cosine decay to `floor` x the learning rate."""
    warm = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))))


class WeightsAverage:
    """Exponential moving average of a module's floating-point state (what is saved)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.module, self.decay = module, decay
        self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self) -> None:
        for k, v in self.module.state_dict().items():
            if v.dtype.is_floating_point:
                self.state[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)
            else:
                self.state[k].copy_(v)


def save_weights(out: Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write safetensors with JSON-encoded metadata values (the loader reads configs from them)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out),
              metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    return out


class TrainingLoop:
    """AdamW with warm-up + cosine decay, gradient clipping at norm 1, an EMA of the weights and a
    smoothed loss log: the optimizer side both trainers share (`step` once per batch, then `save`)."""

    def __init__(self, module: torch.nn.Module, steps: int, lr: float, ema_decay: float, log=None):
        self.module, self.steps, self.log = module, steps, log
        self.opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0)
        self.lr_at = warmup_cosine(self.opt, steps)
        self.ema = WeightsAverage(module, ema_decay)
        self.loss_ema: float | None = None
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def step(self, it: int, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        self.opt.step()
        self.lr_at.step()
        self.ema.update()
        value = loss.item()
        self.loss_ema = value if self.loss_ema is None else 0.98 * self.loss_ema + 0.02 * value
        if self.log and (it % 100 == 0 or it == self.steps - 1):
            self.log(f"step {it:5d}/{self.steps}  loss {self.loss_ema:.4f}  {time.perf_counter() - self.t0:6.1f} s")

    def save(self, out: Path, meta: dict) -> dict:
        """Write the averaged weights; the summary: path, final smoothed loss, wall and CPU seconds, parameters."""
        seconds, cpu_seconds = time.perf_counter() - self.t0, time.process_time() - self.c0
        save_weights(out, self.ema.state, meta)
        return {"path": str(out), "loss": self.loss_ema, "seconds": seconds, "cpu_seconds": cpu_seconds,
                "params": sum(p.numel() for p in self.module.parameters())}
