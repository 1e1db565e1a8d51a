"""Composition layer: one multi-stage generation on an emulated cell (`testbed run`, TUI, sweeps).

`Runner` brings up (or attaches to) the emulation, generates the run's MQTT credentials
and ACL, starts the broker and one `testbed-agent` per device inside its node, runs the
selection and the orchestrator (relay/server.py), writes the run's outputs, and tears
down what it brought up — also on errors and Ctrl-C:

    OUT/result.json    the `testbed run --json` document (RunResult.to_json())
    OUT/events.jsonl   every telemetry event, flushed as it happens
    OUT/image.png      the generated image
    OUT/logs/          agent-<device>.log, broker.log

This is the only module that uses both `emulation/` and `relay/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.errors import RunFailedError, TopologyError
from testbed.model.profiles import load_profiles, step_time_s
from testbed.relay import security
from testbed.relay.agent import AgentConfig
from testbed.relay.server import DevicePower, Orchestrator, RelayOutcome
from testbed.composition.meta import run_meta
from testbed.model.topology import Topology

__all__ = ["Runner", "RunResult", "METHODS"]

METHODS = ("multistage",)
_AGENT_STARTUP_S = 60.0  # per 2 CPU cores: importing torch + diffusers and loading a model


@dataclass
class RunResult:
    doc: dict[str, Any]
    out_dir: Path | None

    def to_json(self) -> dict[str, Any]:
        return self.doc


def _fixed_selection(costs: list[Any], order: list[str], t_max_s: float, e_max_j: float) -> Any:
    from testbed.selection import Selection

    by_id = {c.id: c for c in costs}
    unknown = [d for d in order if d not in by_id]
    if unknown:
        raise TopologyError(f"relay order names unknown devices {unknown}; devices: {', '.join(by_id)}")
    chosen = [by_id[d] for d in order]
    return Selection(strategy="fixed", t_max_s=t_max_s, e_max_j=e_max_j, devices=list(costs), selected=list(order),
                     objective_mb=sum(c.size_mb for c in chosen), latency_s=sum(c.latency_s for c in chosen),
                     energy_j=sum(c.energy_j for c in chosen), solve_ms=0.0, chosen=chosen)


class Runner:
    """`async with Runner(topo, ...) as r: result = await r.run()` — one generation."""

    def __init__(
        self,
        topo: Topology,
        *,
        run_id: str | None = None,
        backend: str = "netns",
        method: str = "multistage",
        strategy: str = "dp",
        t_max_s: float | None = None,
        e_max_j: float | None = None,
        out_dir: Path | str | None = None,
        seed: int | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        attach: bool = False,
    ):
        if method not in METHODS:
            raise TopologyError(f"--method {method!r}: only {', '.join(METHODS)} runs over the relay "
                                "(split diffusion is testbed.composition.split_runner.SplitRun: `testbed run --method split`)")
        if seed is not None:
            topo = topo.model_copy(update={"seed": seed})
        self.topo = topo
        self.backend, self.method, self.strategy = backend, method, strategy
        self.t_max_s = t_max_s if t_max_s is not None else topo.budgets.t_max_s
        self.e_max_j = e_max_j if e_max_j is not None else topo.budgets.e_max_j
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.on_event = on_event
        self.attach = attach
        self.run_id = run_id
        self.emu: Any = None
        self._owns_emu = False
        self._events_file: Any = None
        self._pids: dict[str, int] = {}
        self._pool: Any = None
        self._model_task: asyncio.Future | None = None
        self._observer_path: Path | None = None
        self._online = False
        self._logs_dir: Path = Path(".")
        self.template_start_s: float | None = None
        self._state_dir: Path | None = None
        self._orch: Orchestrator | None = None
        self._orch_loop: asyncio.AbstractEventLoop | None = None  # the orchestrator's (server namespace)
        self._mqtt_backlog: list[dict[str, Any]] = []  # own events made before the orchestrator exists
        self._kill_tasks: list[asyncio.Task] = []
        self.broker: Any = None
        self.creds: security.RunCredentials | None = None

    # -- lifecycle ---------------------------------------------------------------------
    async def __aenter__(self) -> Runner:
        from testbed.emulation import Emulation
        from testbed.emulation.runs import make_run_dir, new_run_id, run_dir, write_topology

        if self.out_dir is not None:
            (self.out_dir / "logs").mkdir(parents=True, exist_ok=True)
            self._events_file = open(self.out_dir / "events.jsonl", "w", buffering=1)  # noqa: SIM115 - one Runner, one file
        try:
            if self.attach:
                from testbed.composition.run_attach import AttachedCell

                if self.run_id is None:
                    raise RunFailedError("attach: give the run id of a cell that `testbed up` keeps alive (--run ID)")
                self.emu = AttachedCell(self.run_id, self.topo)
                self._state_dir = run_dir(self.run_id) / f"gen-{os.getpid()}-{int(time.time() * 1e3) % 10**6}"
                self._state_dir.mkdir(mode=0o700)
                await self._start_relay()
                return self
            self.run_id = self.run_id or new_run_id()
            self._state_dir = make_run_dir(self.run_id)
            write_topology(self.run_id, self.topo)  # for `testbed tui --attach RUN`
            self.emu = Emulation(self.topo, self.run_id, backend=self.backend, state_dir=self._state_dir)
            await self.emu.__aenter__()
            self._owns_emu = True
            await self._start_relay()
        except BaseException:
            await asyncio.shield(self._teardown())
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.shield(self._teardown())

    async def _start_relay(self) -> None:
        from testbed.emulation.runs import write_state
        from testbed.relay.stage import StageModel

        wl = self.topo.workload
        # the orchestrator's own fp32 model (initial latent, conditioning, decoding) loads
        # while the agents start
        self._model_task = asyncio.ensure_future(asyncio.to_thread(StageModel.load, wl.model, "fp32"))
        devices = self.emu.device_ids()
        self.creds = security.make_credentials(self.run_id, devices)
        host = self.emu.nodes["server"].address
        if self.attach:
            from testbed.composition.run_attach import ATTACH_BROKER_PORT

            port = ATTACH_BROKER_PORT
        else:
            port = 1883
        secrets = self._state_dir / "secrets"
        paths = security.write_security_files(secrets, self.creds, host, port)
        self._observer_path = (self._state_dir.parent if self.attach else self._state_dir) / "observer.json"
        shutil.copy2(paths["observer"], self._observer_path)
        max_msg = wl.payload_bytes + 4 * 2**20
        self.broker = await self._start_broker(paths["password_file"], paths["acl_file"], max_msg, port)
        profiles = load_profiles()
        agent_bin = Path(sys.executable).with_name("testbed-agent")
        argv0 = [str(agent_bin)] if agent_bin.exists() else [sys.executable, "-m", "testbed.relay.agent"]
        logs = (self.out_dir / "logs") if self.out_dir is not None else (self._state_dir / "logs")
        self._logs_dir = logs
        logs.mkdir(parents=True, exist_ok=True)
        if os.environ.get("TESTBED_AGENT_POOL", "1") != "0":
            from testbed.composition.agent_pool import AgentPool

            self._pool = AgentPool(self._state_dir / "agent-pool.sock", logs / "agent-template.log")
            self.template_start_s = await self._pool.start()
        for link in self.emu.links:
            node = self.emu.nodes[link.id]
            c = self.creds.for_device(link.id)
            cfg = AgentConfig(
                run=self.run_id, device=link.id, broker_host=self.broker.host, broker_port=self.broker.port,
                username=c.username, password=c.password, model=wl.model, precision=link.precision,
                compute=wl.compute, step_time_s=step_time_s(profiles[link.profile], wl.resolution_px, link.precision),
                cpu_cores=node.cpu_quota_cores or float(os.cpu_count() or 1), payload_bytes=wl.payload_bytes,
                max_message_bytes=max_msg,
            )
            path = self._state_dir / "agents" / f"{link.id}.json"
            cfg.write(path)
            env = {"TESTBED_AGENT_CONFIG": str(path), "OMP_NUM_THREADS": str(max(1, int(cfg.cpu_cores)))}
            args = [self.run_id, link.id, "--config", str(path)]
            if self._pool is not None:
                procs = list(self.emu.cg.procs_files(self.run_id, link.id)) if self.emu.cg is not None else []
                extra_ns: list[str] = []
                if hasattr(self.emu.backend, "cgroup_procs"):  # docker: into the container's cgroups,
                    procs = self.emu.backend.cgroup_procs(link.id)  # network, mount, UTS and IPC namespaces
                    extra_ns = self.emu.backend.namespaces(link.id)
                self._pids[link.id] = await self._pool.spawn(node.netns, procs, ["testbed-agent", *args], env,
                                                             logs / f"agent-{link.id}.log", extra_ns=extra_ns)
            else:
                self._pids[link.id] = await self.emu.spawn(link.id, [*argv0, *args], env, logs / f"agent-{link.id}.log")
        if not self.attach:  # an attached cell's state.json belongs to its supervisor
            write_state(self.run_id, self.emu.status() | {"ready": True, "relay": True, "topology": self.topo.name,
                                                           "observer": str(self._observer_path)})

    async def in_server_ns(self, factory: Callable[[], Any]) -> Any:
        """Await `factory()` (a coroutine) on an event loop in a thread inside the edge
        server's namespace, so that its sockets reach the broker at 198.18.0.1 whether or
        not this run owns the host's route to 198.18.0.0/16 (concurrent runs share it)."""
        from testbed.composition.ns_loop import run_in_netns

        return await run_in_netns(self.emu.nodes["server"].netns, factory, name=f"tb-{self.run_id}-server-ns")

    def _threadsafe_event(self, loop: asyncio.AbstractEventLoop) -> Callable[[dict[str, Any]], None]:
        return lambda ev: loop.call_soon_threadsafe(self._event, ev)

    async def _start_broker(self, password_file: Path, acl_file: Path, max_msg: int, port: int | None = None) -> Any:
        """The broker in the server node (or container) in the run's state directory, on
        `port` (default: the port of the broker it replaces, else 1883); broker.py decides
        which user mosquitto runs as. testbed/composition/faults.py's broker restart calls it again."""
        from testbed.emulation.broker import start_broker

        emu = self.emu
        if port is None:
            port = self.broker.port if self.broker is not None else 1883
        procs = tuple(emu.cg.procs_files(self.run_id, "server")) if emu.cg is not None else ()
        spawn = None
        if hasattr(emu.backend, "spawn"):  # docker: inside the server container (docker exec)
            spawn = lambda argv, log_path: emu.backend.spawn("server", argv, None, log_path)  # noqa: E731
        emu.broker = await start_broker(emu.nodes["server"].netns, emu.nodes["server"].address, self._state_dir / "broker",
                                        password_file=password_file, acl_file=acl_file, max_message_bytes=max_msg,
                                        cgroup_procs=procs, spawn=spawn, port=port)
        return emu.broker

    async def wait_online(self, timeout_s: float | None = None) -> float:
        """Wait until every device's agent reported "online" (bounded); returns the seconds waited."""
        t0 = time.monotonic()
        waiting = asyncio.ensure_future(self.in_server_ns(lambda: self._wait_online(timeout_s)))
        try:
            while not waiting.done():  # an agent that died at start fails the wait at once
                await asyncio.wait({waiting}, timeout=0.5)
                if not waiting.done():
                    self._check_agents_alive()
            waiting.result()
        finally:
            if not waiting.done():
                waiting.cancel()
                with contextlib.suppress(BaseException):
                    await waiting
        waited = time.monotonic() - t0
        self._online = True
        self._event_local("agents_online", None, devices=len(self.emu.links), waited_s=waited)
        return waited

    def _check_agents_alive(self) -> None:
        from testbed.emulation.procs import pid_alive

        for dev, pid in self._pids.items():
            if not pid_alive(pid):
                log = self._logs_dir / f"agent-{dev}.log"
                tail = ""
                if log.exists():
                    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
                    tail = lines[-1] if lines else ""
                raise RunFailedError(f"the agent of {dev} exited before coming online: {tail or 'no output'} "
                                     f"(log: {log})")

    async def _wait_online(self, timeout_s: float | None) -> None:
        import aiomqtt

        from testbed.relay import topics

        timeout_s = timeout_s if timeout_s is not None else _AGENT_STARTUP_S + 4.0 * len(self.emu.links)
        want, seen = set(self.emu.device_ids()), set()
        async with aiomqtt.Client(self.broker.host, self.broker.port, username=self.creds.server.username,
                                  password=self.creds.server.password, timeout=10,
                                  identifier=f"tb-{self.run_id}-runner") as client:
            await client.subscribe(f"tb/{self.run_id}/dev/+/status", qos=1)
            try:
                async with asyncio.timeout(timeout_s):
                    async for m in client.messages:
                        parsed = topics.parse_device_topic(self.run_id, str(m.topic))
                        try:
                            state = json.loads(bytes(m.payload)).get("state")
                        except (ValueError, AttributeError, TypeError):
                            continue
                        if parsed is not None and state == "online":
                            seen.add(parsed[0])
                        if want <= seen:
                            break
            except TimeoutError:
                raise RunFailedError(f"agents {sorted(want - seen)} did not come online within {timeout_s:g} s; "
                                     "see their logs (OUT/logs/agent-<device>.log)") from None

    async def _teardown(self) -> None:
        for t in self._kill_tasks:
            t.cancel()
        if self._model_task is not None:  # wait for it, and read its outcome (an error is reported elsewhere)
            with contextlib.suppress(BaseException):
                await self._model_task
        from testbed.emulation.procs import stop_pid

        await asyncio.gather(*(stop_pid(pid, timeout_s=2.0) for pid in self._pids.values()), return_exceptions=True)
        self._pids.clear()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        broker_log = getattr(self.broker, "log_path", None)
        if self.out_dir is not None and broker_log is not None and Path(broker_log).exists():
            with contextlib.suppress(OSError):
                shutil.copy2(broker_log, self.out_dir / "logs" / "broker.log")
        if self.emu is not None and self.attach:  # only what this generation started
            if self.emu.broker is not None:
                with contextlib.suppress(Exception):
                    await self.emu.broker.stop()
                self.emu.broker = None
            self.emu = None
            if self._state_dir is not None:
                shutil.rmtree(self._state_dir, ignore_errors=True)
            if self._observer_path is not None:
                self._observer_path.unlink(missing_ok=True)
        if self.emu is not None and self._owns_emu:
            try:
                await self.emu.__aexit__(None, None, None)
            finally:
                self.emu = None
                if self._state_dir is not None:
                    shutil.rmtree(self._state_dir, ignore_errors=True)
        if self._events_file is not None:
            self._events_file.close()
            self._events_file = None

    # -- events and faults -------------------------------------------------------------
    def _event(self, ev: dict[str, Any]) -> None:
        if self._events_file is not None:
            self._events_file.write(json.dumps(ev) + "\n")
            self._events_file.flush()
        if self.on_event is not None:
            self.on_event(ev)
        if getattr(self, "faults", None) is not None:  # the topology's `faults:` (testbed/composition/faults.py)
            self.faults.feed(ev)
        fail = getattr(self, "_fail", None)
        if fail and ev["type"] == "downloaded" and ev["device"] == fail:
            self._fail = None
            # in the middle of its stage's computation: half the predicted compute time
            delay = 0.5 * self._costs[fail].t_cmp_s
            self._kill_tasks.append(asyncio.get_running_loop().create_task(self._kill_later(fail, delay)))

    async def _kill_later(self, device_id: str, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        await self.kill(device_id)

    async def kill(self, device_id: str) -> None:
        """Fault injection: end the device's agent process (its last will reports it offline)."""
        if self.emu is None:
            raise RunFailedError("kill: no emulation is up")
        from testbed.emulation.procs import stop_pid

        self._event_local("fault_injected", device_id, kind="kill")
        pid = self._pids.pop(device_id, None)
        if pid is not None:
            await stop_pid(pid, timeout_s=1.0)
        await self.emu.kill(device_id)  # anything else left in the node's cgroup

    def _event_local(self, etype: str, device: str | None, **data: Any) -> None:
        ev = {"seq": None, "type": etype, "ts": time.time(), "run": self.run_id, "device": device, "steps": None, **data}
        if self._events_file is not None:
            self._events_file.write(json.dumps(ev) + "\n")
            self._events_file.flush()
        if self.on_event is not None:
            self.on_event(ev)
        # also on tb/<run>/events, through the orchestrator's publisher (in order with its events)
        if self._orch is None:
            self._mqtt_backlog.append(ev)
        elif self._orch_loop is not None:
            with contextlib.suppress(RuntimeError):  # its loop already closed: the run is over
                self._orch_loop.call_soon_threadsafe(self._orch.forward, ev)

    async def _orchestrate(self, orch: Orchestrator, finalize: Callable[[Any], Any]) -> RelayOutcome:
        self._orch_loop = asyncio.get_running_loop()
        try:
            return await orch.run(finalize=finalize)
        finally:
            self._orch_loop = None

    # -- the generation ----------------------------------------------------------------
    @property
    def agent_pids(self) -> dict[str, int]:
        """pid of every device's agent (bench/relay.py measures their memory)."""
        return dict(self._pids)

    @property
    def template_pid(self) -> int | None:
        return self._pool.pid if self._pool is not None else None

    def current_links(self) -> list[Any]:
        """The devices' links with the rates the emulation applies now (mobility, set_link)."""
        out = []
        for link in self.emu.links:
            node = self.emu.nodes[link.id]
            out.append(link.model_copy(update={"rate_up_mbps": node.rate_up_mbps or link.rate_up_mbps,
                                               "rate_down_mbps": node.rate_down_mbps or link.rate_down_mbps}))
        return out

    async def run(self, fail: str | None = None, faults: list | None = None,
                  order: list[str] | None = None) -> RunResult:
        """One generation. `order` skips the selection and relays through those devices
        (benchmarks); otherwise the strategy chooses under the budgets. `faults` (default:
        the topology's `faults:`) are injected by testbed/composition/faults.py."""
        from testbed.selection import device_costs, select

        topo, wl = self.topo, self.topo.workload
        self._orch = None  # this generation's events wait for its orchestrator
        if not self._online:
            await self.wait_online()
        costs = device_costs(topo, self.current_links())
        self._costs = {c.id: c for c in costs}
        if order is None:
            sel = select(costs, self.t_max_s, self.e_max_j, strategy=self.strategy, seed=topo.seed)
        else:
            sel = _fixed_selection(costs, order, self.t_max_s, self.e_max_j)
        if fail is not None and fail not in sel.selected:
            raise TopologyError(f"--fail {fail}: not a selected device (selected: {', '.join(sel.selected)}); "
                                "pick one of those")
        self._fail = fail
        from testbed.composition.faults import FaultInjector  # `faults` (default: the topology's); --fail's kill is not repeated

        specs = topo.faults if faults is None else faults
        self.faults = FaultInjector(self, [f for f in specs if not (fail and f.kind == "kill" and f.device == fail)])
        self._event_local("selection", None, strategy=self.strategy, selected=sel.selected,
                          predicted_latency_s=sel.latency_s, predicted_energy_j=sel.energy_j,
                          objective_mb=sel.objective_mb, solve_ms=sel.solve_ms)
        profiles = load_profiles()
        power = {link.id: DevicePower(profiles[link.profile].compute_power_w, profiles[link.profile].radio_tx_power_w,
                                      profiles[link.profile].radio_rx_power_w) for link in self.emu.links}
        model = await self._model_task
        n_dev = len(self.emu.links)
        orch = Orchestrator(
            run=self.run_id, broker_host=self.broker.host, broker_port=self.broker.port,
            username=self.creds.server.username, password=self.creds.server.password,
            costs=costs, relay_order=sel.selected, power=power, model=model, steps_per_stage=wl.steps_per_stage,
            prompt=wl.prompt, seed=topo.seed, scheduler=wl.scheduler, payload_bytes=wl.payload_bytes,
            t_max_s=self.t_max_s, e_max_j=self.e_max_j, emit=self._threadsafe_event(asyncio.get_running_loop()),
            online_timeout_s=_AGENT_STARTUP_S + 4.0 * n_dev,
            deadline_factor=2.0 if wl.compute == "profile" else 20.0,
            deadline_slack_s=2.0 if wl.compute == "profile" else 60.0,
        )
        for ev in self._mqtt_backlog:
            orch.forward(ev)
        self._mqtt_backlog.clear()
        self._orch = orch
        image_info: dict[str, Any] = {}

        async def finalize(outcome: RelayOutcome) -> dict[str, Any]:
            image_info.update(await asyncio.to_thread(self._image, model, outcome.latent))
            return {"ms_ssim": image_info.get("ms_ssim"), "image": image_info.get("image")}

        try:
            outcome = await self.in_server_ns(lambda: self._orchestrate(orch, finalize))
        finally:
            await self.faults.close()
        doc = self._result_doc(sel, outcome, image_info, model)
        doc["faults"] = [f.to_json() for f in self.faults.injected]
        if self.out_dir is not None:
            (self.out_dir / "result.json").write_text(json.dumps(doc, indent=2) + "\n")
        return RunResult(doc, self.out_dir)

    def _image(self, model: Any, latent: Any) -> dict[str, Any]:
        from testbed.diffusion.quality import ms_ssim, reference_image

        wl = self.topo.workload
        img = model.decode(latent)
        info: dict[str, Any] = {"image": None, "ms_ssim": None, "image_shape": list(img.shape)}
        if self.out_dir is not None:
            from PIL import Image

            path = self.out_dir / "image.png"
            Image.fromarray(img).save(path)
            info["image"] = str(path)
        ref = reference_image(wl.model, wl.prompt, self.topo.seed, steps=wl.reference_steps, scheduler_kind=wl.scheduler)
        info["ms_ssim"] = ms_ssim(img, ref)
        return info

    def _result_doc(self, sel: Any, out: RelayOutcome, image: dict[str, Any], model: Any) -> dict[str, Any]:
        return {
            "run": self.run_id,
            "method": self.method,
            "strategy": self.strategy,
            "selected": list(sel.selected),
            "relay_order": [s.device for s in out.stages],
            "stages": [s.to_json() for s in out.stages],
            "latency_s": out.latency_s,
            "energy_j": out.energy_j,
            "predicted_latency_s": sel.latency_s,
            "predicted_energy_j": sel.energy_j,
            "t_max_s": self.t_max_s,
            "e_max_j": self.e_max_j,
            "within_budget": {"latency": out.latency_s <= self.t_max_s, "energy": out.energy_j <= self.e_max_j},
            "objective_mb": sel.objective_mb,
            "total_steps": out.total_steps,
            "ms_ssim": image.get("ms_ssim"),
            "image": image.get("image"),
            "recovered": [r.to_json() for r in out.recovered],
            "meta": run_meta(self.topo, self.emu, self.broker, out, model, image),
        }
