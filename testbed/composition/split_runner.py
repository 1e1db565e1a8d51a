"""`SplitRun`: the split-diffusion baseline over the emulated network, shaped like `Runner`.

    async with SplitRun(topo, t_max_s=2, e_max_j=200) as r:
        result = await r.run()                  # SplitResult; .to_json() like RunResult's
                                                # (OUT/result.json, image.png, events.jsonl)
        other = await r.run(t_max_s=4)          # same emulation, other budgets

Composes the layers: the emulation (namespaces, shaped links, cgroups, broker with the
run's per-device credentials), the split plan (relay/split_plan.py: the pair and the step
count from the budgets), split agents spawned in the two devices' namespaces (started on
first use and kept for later runs of the same emulation), the split orchestrator
(relay/split.py) in the edge server's namespace, then decode + MS-SSIM against the fp32
reference.

The result document has the multi-stage run's fields (run, method, strategy, selected,
stages, latency_s, energy_j, predicted_latency_s, ms_ssim, image, recovered, meta); its
stages are one record per denoising step (`device` "head>tail", both hops inside).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from testbed.errors import ResourceError, TopologyError
from testbed.model.topology import Topology

__all__ = ["SplitRun", "SplitResult", "feature_bytes_fn"]

SPLIT_STRATEGY = "best-pair"


def feature_bytes_fn(resolution_px: int) -> Callable[[str], int]:
    """Wire size of one step's cut tensors for a head of a given precision (SD1.5's shapes)."""
    from testbed.diffusion.split import sd15_split_bytes_per_step
    from testbed.selection.split_plan import activation_bytes

    return lambda precision: sd15_split_bytes_per_step(resolution_px, activation_bytes(precision), 2)


@dataclass
class SplitResult:
    run: str
    t_max_s: float
    e_max_j: float
    seed: int
    selected: list[str]
    stages: list[dict[str, Any]]
    latency_s: float
    energy_j: float
    predicted_latency_s: float
    predicted_energy_j: float
    total_steps: int
    ms_ssim: float
    image: str | None
    image_array: np.ndarray | None = field(default=None, repr=False)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run, "method": "split", "strategy": SPLIT_STRATEGY, "t_max_s": self.t_max_s,
            "e_max_j": self.e_max_j, "seed": self.seed, "selected": list(self.selected),
            "relay_order": list(self.selected), "stages": self.stages,
            "latency_s": self.latency_s, "energy_j": self.energy_j, "predicted_latency_s": self.predicted_latency_s,
            "predicted_energy_j": self.predicted_energy_j, "total_steps": self.total_steps,
            "ms_ssim": self.ms_ssim, "image": self.image, "recovered": [], "meta": self.meta,
        }


class SplitRun:
    """One emulation of `topo` on which split runs are made (any number, any budgets)."""

    def __init__(
        self,
        topo: Topology,
        *,
        run_id: str | None = None,
        backend: str = "netns",
        method: str = "split",
        strategy: str = SPLIT_STRATEGY,
        t_max_s: float | None = None,
        e_max_j: float | None = None,
        out_dir: Path | str | None = None,
        seed: int | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        attach: bool = False,
        agent_ready_timeout_s: float = 180.0,
    ):
        if method != "split" or strategy not in (SPLIT_STRATEGY, "dp"):
            raise TopologyError(f"SplitRun runs method 'split' (pair choice {SPLIT_STRATEGY!r}), "
                                f"not {method!r}/{strategy!r}")
        if attach:
            raise ResourceError("split runs bring up their own emulation; run without --run")
        self.topo = topo
        self.run_id = run_id
        self.backend = backend
        self.t_max_s = t_max_s if t_max_s is not None else topo.budgets.t_max_s
        self.e_max_j = e_max_j if e_max_j is not None else topo.budgets.e_max_j
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.seed = topo.seed if seed is None else seed
        self.on_event = on_event
        self.agent_ready_timeout_s = agent_ready_timeout_s
        self.emu: Any = None
        self.broker: Any = None
        self._creds: Any = None
        self._state: Path | None = None
        self._agents: dict[str, int] = {}
        self._model: Any = None
        self._reference: np.ndarray | None = None
        self._runs = 0
        self.setup_s = 0.0

    async def __aenter__(self) -> SplitRun:
        from testbed.emulation import SERVER_ADDRESS, Emulation
        from testbed.emulation.runs import make_run_dir, new_run_id
        from testbed.relay.security import make_credentials, write_security_files

        t0 = time.perf_counter()
        self.run_id = self.run_id or new_run_id()
        self._state = make_run_dir(self.run_id)
        self.emu = Emulation(self.topo, self.run_id, backend=self.backend, state_dir=self._state)
        await self.emu.__aenter__()
        try:
            self._creds = make_credentials(self.run_id, self.emu.device_ids())
            files = write_security_files(self._state / "secrets", self._creds, SERVER_ADDRESS, 1883)
            self._fbytes = feature_bytes_fn(self.topo.workload.resolution_px)
            self._max_msg = max(self._fbytes("fp32"), self.topo.workload.payload_bytes) + 4 * 2**20
            self.broker = await self.emu.start_broker(password_file=files["password_file"], acl_file=files["acl_file"],
                                        max_message_bytes=self._max_msg)
            self._model, self._reference = await asyncio.to_thread(self._load_server_side)
        except BaseException:
            await self._close()
            raise
        self.setup_s = time.perf_counter() - t0
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._close()

    async def _close(self) -> None:
        import shutil

        if self.emu is not None:
            try:
                await self.emu.__aexit__(None, None, None)
            finally:
                self.emu = None
                if self._state is not None:
                    shutil.rmtree(self._state, ignore_errors=True)

    def _load_server_side(self) -> tuple[Any, np.ndarray]:
        from testbed.diffusion import load_model, reference_image

        wl = self.topo.workload
        model = load_model(wl.model, "fp32")
        ref = reference_image(wl.model, wl.prompt, self.seed, wl.reference_steps, wl.scheduler)
        return model, ref

    async def _ensure_agent(self, device: str) -> None:
        from testbed.emulation import SERVER_ADDRESS
        from testbed.model.profiles import load_profiles, step_time_s
        from testbed.relay.agent import AgentConfig

        if device in self._agents:
            return
        assert self._state is not None
        link = next(lk for lk in self.emu.links if lk.id == device)
        prof = load_profiles()[link.profile]
        wl = self.topo.workload
        cred = self._creds.for_device(device)
        cfg = AgentConfig(run=self.run_id, device=device, broker_host=SERVER_ADDRESS, broker_port=1883,
                          username=cred.username, password=cred.password, model=wl.model, precision=link.precision,
                          compute=wl.compute, step_time_s=step_time_s(prof, wl.resolution_px, link.precision),
                          cpu_cores=prof.cpu_cores, payload_bytes=wl.payload_bytes, max_message_bytes=self._max_msg)
        path = self._state / "secrets" / f"split-{device}.json"
        cfg.write(path)
        argv = [sys.executable, "-m", "testbed.relay.split_agent", self.run_id, device, "--config", str(path)]
        log = self._state / "logs" / f"split-{device}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self._agents[device] = await self.emu.spawn(device, argv, {"PYTHONUNBUFFERED": "1"}, log)

    def _event(self, ev: dict[str, Any]) -> None:
        """Telemetry: OUT/events.jsonl (with out_dir) and on_event (called from the
        orchestrator's thread)."""
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "events.jsonl", "a") as f:
                f.write(json.dumps(ev) + "\n")
        if self.on_event is not None:
            self.on_event(ev)

    async def run(self, fail: Any = None, *, t_max_s: float | None = None, e_max_j: float | None = None) -> SplitResult:
        """One split generation under the budgets (default: the constructor's / the topology's)."""
        from testbed.diffusion import decode, ms_ssim
        from testbed.emulation import SERVER_ADDRESS
        from testbed.model.profiles import load_profiles
        from testbed.relay.server import DevicePower
        from testbed.relay.split import SplitOrchestrator
        from testbed.selection.split_plan import plan_split

        if self.emu is None:
            raise ResourceError("SplitRun.run() outside `async with SplitRun(...)`")
        if fail is not None:
            raise ResourceError("split runs take no fault injection (split inference has no recovery)")
        t_max = self.t_max_s if t_max_s is None else t_max_s
        e_max = self.e_max_j if e_max_j is None else e_max_j
        links = list(self.emu.links)
        plan = plan_split(self.topo, links, t_max, e_max, self._fbytes)
        await asyncio.gather(self._ensure_agent(plan.head), self._ensure_agent(plan.tail))
        profiles = load_profiles()
        power = {lk.id: DevicePower(profiles[lk.profile].compute_power_w, profiles[lk.profile].radio_tx_power_w,
                                    profiles[lk.profile].radio_rx_power_w) for lk in links}
        wl = self.topo.workload
        self._runs += 1
        orch = SplitOrchestrator(
            run=self.run_id, broker_host=SERVER_ADDRESS, broker_port=1883, username=self._creds.server.username,
            password=self._creds.server.password, plan=plan, power=power, model=self._model, prompt=wl.prompt,
            seed=self.seed, scheduler=wl.scheduler, payload_bytes=wl.payload_bytes, emit=self._event,
            online_timeout_s=self.agent_ready_timeout_s,
        )
        # The orchestrator runs on the edge server: its event loop lives in a thread inside the
        # server's namespace, so it reaches this run's broker even when another run on the
        # host owns the host route to 198.18.0.0/16 (events reach on_event from that thread).
        from testbed.emulation.nsutil import in_netns

        outcome = await asyncio.to_thread(in_netns, self.emu.nodes["server"].netns, lambda: asyncio.run(orch.run()))
        image = await asyncio.to_thread(decode, self._model, outcome.latent)
        quality = float(await asyncio.to_thread(ms_ssim, image, self._reference))
        image_path = None
        if self.out_dir is not None:
            from PIL import Image

            self.out_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(self.out_dir / "image.png")
            image_path = str(self.out_dir / "image.png")
        status = self.emu.status()
        result = SplitResult(
            run=self.run_id, t_max_s=float(t_max), e_max_j=float(e_max), seed=self.seed,
            selected=[plan.head, plan.tail], stages=[r.to_json() for r in outcome.steps],
            latency_s=outcome.latency_s, energy_j=outcome.energy_j, predicted_latency_s=plan.predicted_latency_s,
            predicted_energy_j=plan.predicted_energy_j, total_steps=outcome.total_steps, ms_ssim=quality,
            image=image_path, image_array=image,
            meta={"plan": plan.to_json(), "run_index": self._runs, "backend": status["backend"],
                  "netem": status["netem"], "warnings": status["warnings"], "setup_s": self.setup_s, "model": wl.model,
                  "compute": wl.compute, "scheduler": wl.scheduler, "broker": status["broker"]},
        )
        if self.out_dir is not None:
            (self.out_dir / "result.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
        return result
