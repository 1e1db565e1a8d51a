"""A Swarm device's keeper: the process its container runs (as root, with NET_ADMIN,
NET_RAW, SETUID, SETGID and KILL only), which stands in for what the run owner does from
the host on one machine.

    python -m testbed.composition.keeper /run/secrets/keeper.json          the keeper
    python -m testbed.composition.keeper --agent /run/secrets/keeper.json  its agent

At its start it shapes its own link to the radio model's rates and applies the downlink's
delay and loss (emulation/cluster/device_link.py), then starts the device's agent — which
drops to the device's uid at once, imports and loads its model, and waits for its clock
offset before it connects (device_clock.py) — and connects to the cell's control broker
(its own account; last will: its state "offline", retained; keepalive 1 s, so that a lost
host shows within seconds). It serves the run owner's commands on
`tb/<run>/ctl/<device>/cmd`, one reply each:

    clock                 {"t": this device's clock}
    offset clock_offset_s the agent's clock offset (handed to a waiting agent; kept for later ones)
    start                 the agent running (started when it is not); {"pid"}
    kill                  the agent stopped (SIGTERM, SIGKILL after 2 s)
    rates up_mbps down_mbps, impair delay_ms jitter_ms loss_pct, cut, restore: its link
    status                {"link", "agent"}

The secret (0400 root, the only file of the scenario the container gets) holds the
keeper's control account and the agent's config; the agent reads it as root before it
drops privileges and never sees the keeper's account afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from testbed.composition.device_clock import device_time, discipline
from testbed.model.impairments import Impairment

__all__ = ["SECRET_PATH", "Keeper", "AgentProcess", "agent_main", "main"]

SECRET_PATH = "/run/secrets/keeper.json"
KEEPALIVE_S = 1
_POLL_S = 0.2


class AgentProcess:
    """The device's agent: `python -m testbed.composition.keeper --agent SECRET`, whose
    stdin takes one line, its clock offset."""

    def __init__(self, secret: str):
        self.secret = secret
        self.proc: subprocess.Popen | None = None
        self.offset_s: float | None = None
        self.fed = False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> int:
        if not self.running:
            self.proc = subprocess.Popen([sys.executable, "-m", "testbed.composition.keeper", "--agent", self.secret],
                                         stdin=subprocess.PIPE, start_new_session=True)
            self.fed = False
            self.feed()
        assert self.proc is not None
        return self.proc.pid

    def feed(self, offset_s: float | None = None) -> None:
        """Hand the agent its clock offset (once; a later agent gets the kept one)."""
        if offset_s is not None:
            self.offset_s = offset_s
        if self.running and not self.fed and self.offset_s is not None and self.proc and self.proc.stdin:
            with contextlib.suppress(OSError):
                self.proc.stdin.write(f"{self.offset_s!r}\n".encode())
                self.proc.stdin.close()
                self.fed = True

    async def stop(self, timeout_s: float = 2.0) -> None:
        if self.proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            deadline = time.monotonic() + timeout_s
            while self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.proc.pid if self.proc else None, "running": self.running,
                "exit_code": None if self.proc is None else self.proc.poll(), "waiting_offset": self.running and not self.fed}


class Keeper:
    """The keeper's state and its command loop (see the module docstring)."""

    def __init__(self, cfg: dict[str, Any], secret: str):
        self.cfg, self.run, self.device = cfg, cfg["run"], cfg["device"]
        self.agent = AgentProcess(secret)
        self.link: Any = None
        self.address: str | None = None

    async def setup(self) -> None:
        from testbed.emulation.cluster.device_link import DeviceLinkOps, find_interface

        ifname, self.address = await find_interface(self.cfg["cell_subnet"])
        link = self.cfg["link"]
        self.link = DeviceLinkOps(ifname, self.cfg["server_address"], self.run)
        await self.link.setup(float(link["up_mbps"]), float(link["down_mbps"]), bool(self.cfg.get("gso_off", True)))
        await self.link.impair(Impairment(**link.get("down") or {}))
        print(f"keeper {self.device}: {ifname} {self.address}, up {link['up_mbps']:g} down {link['down_mbps']:g} Mbit/s",
              flush=True)

    def state(self, state: str = "ready") -> bytes:
        return json.dumps({"state": state, "device": self.device, "address": self.address,
                           "link": self.link.status() if self.link is not None and state == "ready" else None,
                           "agent": self.agent.to_json(), "agent_waiting": self.agent.running and not self.agent.fed,
                           "ts": device_time()}).encode()

    async def op(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd.get("op")
        if op == "clock":
            return {"t": device_time()}
        if op == "offset":
            self.agent.feed(float(cmd["clock_offset_s"]))
            return {}
        if op == "start":
            return {"pid": self.agent.start()}
        if op == "kill":
            await self.agent.stop()
            return {}
        if op == "rates":
            await self.link.set_rates(float(cmd["up_mbps"]), float(cmd["down_mbps"]))
            return {}
        if op == "impair":
            await self.link.impair(Impairment(float(cmd["delay_ms"]), float(cmd["jitter_ms"]), float(cmd["loss_pct"])))
            return {}
        if op in ("cut", "restore"):
            await self.link.set_cut(op == "cut")
            return {}
        if op == "status":
            return {"link": self.link.status(), "agent": self.agent.to_json()}
        raise ValueError(f"unknown op {op!r}")

    async def serve(self) -> None:
        import aiomqtt

        from testbed.relay import topics
        from testbed.relay.cancel import end_if_cancel_was_swallowed

        ctl = self.cfg["control"]
        state_topic = topics.control(self.run, self.device, "state")
        backoff = 0.2
        while True:
            try:
                will = aiomqtt.Will(state_topic, self.state("offline"), qos=1, retain=True)
                async with aiomqtt.Client(ctl["host"], int(ctl["port"]), username=ctl["username"],
                                          password=ctl["password"], identifier=ctl["username"], will=will,
                                          keepalive=KEEPALIVE_S, clean_session=True, timeout=10) as client:
                    await client.subscribe(topics.control(self.run, self.device, "cmd"), qos=1)
                    await client.publish(state_topic, self.state(), qos=1, retain=True)
                    backoff = 0.2
                    watch = asyncio.create_task(self._watch_agent(client, state_topic))
                    try:
                        async for msg in client.messages:
                            if await self._answer(client, bytes(msg.payload or b"")):
                                await client.publish(state_topic, self.state(), qos=1, retain=True)
                            end_if_cancel_was_swallowed()  # `docker stop` must end it
                    finally:
                        watch.cancel()
            except aiomqtt.MqttError as e:
                print(f"keeper {self.device}: control broker: {e}; again in {backoff:.1f} s", flush=True)
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, 2.0)

    async def _answer(self, client: Any, payload: bytes) -> bool:
        """Run one command and reply; whether the keeper's state may have changed. A clock
        probe is answered at once and at QoS 0, as it came (no acknowledgement on its way)."""
        from testbed.relay import topics

        cmd: Any = None
        try:
            cmd = json.loads(payload)
            reply = {"id": cmd.get("id"), "ok": True, "result": await self.op(cmd)}
        except Exception as e:  # noqa: BLE001 - every failure is the reply's, never the keeper's end
            reply = {"id": cmd.get("id") if isinstance(cmd, dict) else None, "ok": False,
                     "error": f"{type(e).__name__}: {e}"}
        probe = isinstance(cmd, dict) and cmd.get("op") in ("clock", "status")
        await client.publish(topics.control(self.run, self.device, "reply"), json.dumps(reply).encode(),
                             qos=0 if probe else 1)
        return not probe

    async def _watch_agent(self, client: Any, state_topic: str) -> None:
        """Publish the state again when the agent exits (a crash, or a kill)."""
        from testbed.relay.cancel import end_if_cancel_was_swallowed

        seen = self.agent.running
        while True:
            await asyncio.sleep(_POLL_S)
            if self.agent.running != seen:
                seen = self.agent.running
                await client.publish(state_topic, self.state(), qos=1, retain=True)
                end_if_cancel_was_swallowed()


def _load(secret: str) -> dict[str, Any]:
    return json.loads(Path(secret).read_text())


async def _keep(secret: str) -> None:
    keeper = Keeper(_load(secret), secret)
    serving = asyncio.current_task()
    assert serving is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, serving.cancel)  # `docker stop`, service removal
    await keeper.setup()
    keeper.agent.start()  # imports and its model now; it waits for its clock offset before it connects
    try:
        await keeper.serve()
    finally:
        await keeper.agent.stop()
        if keeper.link is not None:
            keeper.link.close()


def agent_main(secret: str) -> int:
    """The device's agent: as root its config read, everything it will import imported and
    its model loaded (the interpreter may live under a directory its uid cannot enter, as
    the agent template knows), then the device's uid for good, its clock offset from
    stdin, and `testbed-agent`'s loop."""
    import importlib
    import logging

    import aiomqtt  # noqa: F401 - imported as root (see above)
    from setproctitle import setproctitle

    from testbed.emulation.node_uids import drop_privileges
    from testbed.methods import agent_handlers
    from testbed.relay.agent import AgentConfig, run_agent
    from testbed.relay.stage import StageModel

    cfg = _load(secret)
    agent_cfg = AgentConfig.from_json(cfg["agent"], "the agent config of the device's secret")
    handlers = agent_handlers()
    for where in handlers.values():
        importlib.import_module(where.partition(":")[0])
    StageModel.preload(agent_cfg.model, agent_cfg.precision)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {agent_cfg.device} %(levelname)s %(message)s")
    drop_privileges(int(cfg["uid"]))
    os.chdir("/")
    setproctitle(f"testbed-agent {agent_cfg.run} {agent_cfg.device}")
    line = sys.stdin.readline()
    if not line.strip():
        print(f"agent {agent_cfg.device}: no clock offset (the keeper ended)", file=sys.stderr, flush=True)
        return 1
    discipline(float(line))
    run_agent(agent_cfg, handlers)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--agent"] and len(args) == 2:
        return agent_main(args[1])
    if len(args) != 1:
        print("usage: python -m testbed.composition.keeper [--agent] SECRET", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        asyncio.run(_keep(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
