"""Stage runner: denoising steps [start, end) of an N-step schedule, with the scheduler state handoff.

Role: what one device computes in multi-stage diffusion. DDIM (default) and Euler need only the
latent and the step index; DPM-Solver multistep and PNDM keep history, which `run_stage` exports
as a flat dict of float32 tensors and JSON-able scalars so that the next stage continues exactly.
The loop is diffusers' own: set timesteps, slice the range, unet(...), scheduler.step(...).
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
from typing import Callable

import torch

from testbed.errors import WorkloadError

__all__ = ["SCHEDULERS", "make_scheduler", "num_schedule_steps", "run_stage", "unet_conditioning"]

SCHEDULERS = ("ddim", "euler", "dpm", "pndm")


def _scheduler_class(kind: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

    classes = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm": DPMSolverMultistepScheduler,
               "pndm": PNDMScheduler}
    if kind not in classes:
        raise WorkloadError(f"scheduler {kind!r} is unknown; use one of {', '.join(SCHEDULERS)}")
    return classes[kind]


def make_scheduler(kind: str = "ddim", total_steps: int = 50, model=None, config: dict | None = None):
    """A fresh diffusers scheduler of `kind` from the model's scheduler config, timesteps set for N steps."""
    if total_steps < 1:
        raise WorkloadError(f"total_steps={total_steps}: needs at least 1 denoising step")
    cfg = dict(config if config is not None else model.scheduler_config)
    # building one costs milliseconds (Python loops over 1000 betas): copy a cached template
    return copy.deepcopy(_scheduler_template(kind, int(total_steps), json.dumps(cfg, sort_keys=True)))


@functools.lru_cache(maxsize=64)
def _scheduler_template(kind: str, total_steps: int, cfg_json: str):
    cls = _scheduler_class(kind)
    accepted = set(inspect.signature(cls.__init__).parameters)
    sched = cls(**{k: v for k, v in json.loads(cfg_json).items() if k in accepted})
    sched.set_timesteps(total_steps)
    return sched


def num_schedule_steps(kind: str, total_steps: int, model=None, config: dict | None = None) -> int:
    """UNet calls in the schedule: N, except PNDM (PLMS) which repeats one timestep (N + 1)."""
    return len(make_scheduler(kind, total_steps, model, config).timesteps)


def unet_conditioning(cond: dict[str, torch.Tensor], batch: int, cfg: bool) -> dict[str, torch.Tensor]:
    """UNet keyword tensors for a latent batch: [uncond..., cond...] when guidance is on."""
    out = {}
    for key, v in cond.items():
        if key.startswith("uncond_"):
            continue
        rep = [batch] + [1] * (v.dim() - 1)
        c = v.repeat(*rep) if v.shape[0] == 1 and batch > 1 else v
        if cfg:
            u = cond.get(f"uncond_{key}")
            if u is None:
                raise WorkloadError(f"conditioning has {key!r} but no 'uncond_{key}' for classifier-free guidance")
            u = u.repeat(*rep) if u.shape[0] == 1 and batch > 1 else u
            c = torch.cat([u, c])
        out[key] = c
    return out


def _export_state(sched, kind: str, next_step: int, total_steps: int) -> dict:
    state: dict = {"scheduler": kind, "next_step": next_step, "total_steps": total_steps}
    if kind == "dpm":
        state["lower_order_nums"] = int(sched.lower_order_nums)
        for i, m in enumerate(sched.model_outputs):
            if m is not None:
                state[f"model_outputs.{i}"] = m.detach().float().contiguous()
    elif kind == "pndm":
        state["counter"] = int(sched.counter)
        for i, e in enumerate(sched.ets):
            state[f"ets.{i}"] = e.detach().float().contiguous()
        if sched.cur_sample is not None:
            state["cur_sample"] = sched.cur_sample.detach().float().contiguous()
    return state


def _import_state(sched, kind: str, start: int, total_steps: int, state: dict | None) -> None:
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start)  # Euler/DPM index sigmas by step, not by timestep value
    if start == 0:
        return
    if state is None:
        if kind in ("dpm", "pndm"):
            raise WorkloadError(
                f"scheduler {kind!r} keeps history: a stage starting at step {start} needs the "
                "scheduler_state returned by the previous stage"
            )
        return
    if state.get("scheduler") != kind or state.get("next_step") != start or state.get("total_steps") != total_steps:
        raise WorkloadError(
            f"scheduler_state is for {state.get('scheduler')!r} step {state.get('next_step')} of "
            f"{state.get('total_steps')}, but this stage is {kind!r} step {start} of {total_steps}"
        )
    if kind == "dpm":
        sched.lower_order_nums = int(state["lower_order_nums"])
        sched.model_outputs = [state.get(f"model_outputs.{i}") for i in range(sched.config.solver_order)]
    elif kind == "pndm":
        sched.counter = int(state["counter"])
        sched.ets = [state[f"ets.{i}"] for i in range(4) if f"ets.{i}" in state]
        sched.cur_sample = state.get("cur_sample")


def run_stage(
    model,
    latent: torch.Tensor,
    cond: dict[str, torch.Tensor],
    start: int,
    end: int,
    total_steps: int,
    scheduler_kind: str = "ddim",
    scheduler_state: dict | None = None,
    guidance_scale: float | None = None,
    predict: Callable | None = None,
) -> tuple[torch.Tensor, dict]:
    """Run steps [start, end) of an N-step schedule on `latent`; return the new latent and the handoff state.

    Step 0 takes unit-variance noise (it is scaled by the scheduler's init_noise_sigma here).
    `end == total_steps` runs to the end of the schedule (PNDM has N + 1 UNet calls).
    `predict(x_in, t, unet_kwargs) -> noise` replaces the UNet call (the split runner uses it).
    """
    sched = make_scheduler(scheduler_kind, total_steps, model)
    timesteps = sched.timesteps
    last = len(timesteps)
    if end == total_steps:
        end = last
    if not 0 <= start < end <= last:
        raise WorkloadError(f"stage [{start}, {end}) is outside the {total_steps}-step schedule")
    _import_state(sched, scheduler_kind, start, total_steps, scheduler_state)
    g = model.default_guidance_scale if guidance_scale is None else float(guidance_scale)
    cfg = model.has_cfg and g > 1.0
    dtype = model.compute_dtype
    x = latent.detach().to(model.device, torch.float32)
    if start == 0:
        x = x * sched.init_noise_sigma
    kwargs = {k: (v.to(model.device, dtype) if v.is_floating_point() else v.to(model.device))
              for k, v in unet_conditioning(cond, x.shape[0], cfg).items()}
    if predict is None:
        def predict(x_in, t, kw):
            return model.unet(x_in, t, **kw).sample

    with torch.inference_mode():
        for i in range(start, end):
            t = timesteps[i]
            x_in = torch.cat([x, x]) if cfg else x
            x_in = sched.scale_model_input(x_in, t)
            noise_pred = predict(x_in.to(dtype), t, kwargs).float()
            if cfg:
                noise_uncond, noise_cond = noise_pred.chunk(2)
                noise_pred = noise_uncond + g * (noise_cond - noise_uncond)
            x = sched.step(noise_pred, t, x).prev_sample
    next_step = end if end < last else total_steps
    return x.float().contiguous(), _export_state(sched, scheduler_kind, next_step, total_steps)
