"""Bridge between relay messages (numpy tensors + JSON scalars) and the diffusion workload.

The agent and the orchestrator call these; they convert wire tensors to torch and back
and call `testbed.diffusion` (load_model, encode_prompt, initial_latent, run_stage,
decode). Latents travel as float32 whatever precision a device computes in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from testbed.errors import WorkloadError
from testbed.relay.wire import TensorSpec, join_state, split_state

__all__ = ["LATENT", "StageModel", "pack_task_tensors", "unpack_task_tensors", "to_numpy"]

LATENT = "latent"

_PRELOADED: dict[tuple[str, str], StageModel] = {}  # (model, precision) -> a variant made before a fork


@dataclass
class StageModel:
    """One loaded model variant plus what the wire needs to know about it."""

    name: str
    precision: str
    model: Any

    @classmethod
    def load(cls, name: str, precision: str) -> StageModel:
        warm = _PRELOADED.pop((name, precision), None)  # a forked agent takes its template's copy once
        if warm is not None:
            return warm
        try:
            from testbed.diffusion.models import load_model
        except ImportError as e:  # pragma: no cover - the workload package is part of the project
            raise WorkloadError(f"the diffusion workload is not importable ({e}); reinstall the project") from None
        return cls(name=name, precision=precision, model=load_model(name, precision=precision, device="cpu"))

    @classmethod
    def preload(cls, name: str, precision: str) -> None:
        """Load a variant now for this process's next `load` of it: an agent template loads
        before it forks, so that each forked agent finds its model made (copy-on-write); an
        agent loads before it drops privileges (its uid may not read the model's files)."""
        if (name, precision) not in _PRELOADED:
            _PRELOADED[(name, precision)] = cls.load(name, precision)

    @property
    def latent_spec(self) -> TensorSpec:
        return TensorSpec("float32", (1, *(int(d) for d in self.model.latent_shape)))

    @property
    def compute_dtype(self) -> str:
        """What the UNet really computes in (fp16 is bfloat16 on a CPU)."""
        return str(self.model.compute_dtype).removeprefix("torch.")

    @property
    def size_bytes(self) -> int:
        return int(self.model.size_bytes)

    def initial(self, seed: int) -> np.ndarray:
        from testbed.diffusion.models import initial_latent

        return to_numpy(initial_latent(self.model, seed))

    def encode(self, prompt: str) -> dict[str, np.ndarray]:
        from testbed.diffusion.models import encode_prompt

        return {k: to_numpy(v) for k, v in encode_prompt(self.model, prompt).items()}

    def run(
        self,
        latent: np.ndarray,
        cond: dict[str, np.ndarray],
        start: int,
        end: int,
        total_steps: int,
        scheduler_kind: str,
        state: dict[str, Any] | None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        import torch

        from testbed.diffusion.stages import run_stage

        t_latent = torch.from_numpy(np.array(latent, copy=True))
        t_cond = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in cond.items()}
        t_state = None
        if state:
            t_state = {k: torch.from_numpy(np.array(v, copy=True)) if isinstance(v, np.ndarray) else v
                       for k, v in state.items()}
        out, new_state = run_stage(self.model, t_latent, t_cond, start, end, total_steps,
                                   scheduler_kind=scheduler_kind, scheduler_state=t_state)
        return to_numpy(out).astype(np.float32, copy=False), dict(new_state or {})

    def decode(self, latent: np.ndarray) -> np.ndarray:
        import torch

        from testbed.diffusion.models import decode

        return np.asarray(decode(self.model, torch.from_numpy(np.array(latent, copy=True))))


def to_numpy(t: Any) -> np.ndarray:
    """A torch tensor (or array) as a relayable array: bfloat16/float16 widen to float32, exactly."""
    if hasattr(t, "detach"):
        import torch

        t = t.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        return t.contiguous().numpy()
    return np.asarray(t)


def pack_task_tensors(
    latent: np.ndarray, cond: dict[str, np.ndarray], state: dict[str, Any] | None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Tensors (`latent`, `cond.*`, `sched.*`) and scheduler scalars of one relay message."""
    tensors = {LATENT: np.ascontiguousarray(latent, dtype=np.float32)}
    for k, v in cond.items():
        tensors[f"cond.{k}"] = np.ascontiguousarray(v)
    s_tensors, s_scalars = split_state("sched", state or {})
    tensors.update(s_tensors)
    return tensors, s_scalars


def unpack_task_tensors(
    tensors: dict[str, np.ndarray], sched_scalars: dict[str, Any]
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    cond = {k[len("cond."):]: v for k, v in tensors.items() if k.startswith("cond.")}
    state = join_state("sched", tensors, sched_scalars)
    return tensors[LATENT], cond, state
