"""An agent ends when it is cancelled, also when an await swallows the cancel.

Python 3.11's asyncio.wait_for — inside aiomqtt's publish — returns normally when the cancel
lands as the PUBACK arrives. An agent's loop that went on after that never ended: in CI a
test's teardown waited 900 s on a heartbeat that kept beating. The fake client below swallows
the first cancel the way wait_for does, so the race happens on every run, not by chance.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from testbed.relay import agent as agent_mod
from testbed.relay.agent import Agent, AgentConfig


class _SwallowingClient:
    """An aiomqtt.Client stand-in: its publishes of `block_topic` wait until cancelled, and
    the first returns as if the PUBACK had won the race; `messages` yields one task, then
    nothing."""

    def __init__(self, block_topic: str) -> None:
        self.block_topic = block_topic
        self.published: list[str] = []
        self.blocked = asyncio.Event()
        self.swallowed = False

    async def __aenter__(self) -> _SwallowingClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        return None

    async def subscribe(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def publish(self, topic: str, payload: bytes = b"", **kwargs: Any) -> None:
        self.published.append(topic)
        if topic != self.block_topic:
            return
        self.blocked.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if self.swallowed:
                raise  # once only: the race is rare, and a test that fails must still end
            self.swallowed = True
            return  # swallowed, as 3.11's wait_for does

    @property
    def messages(self) -> Any:
        async def one_task():
            yield type("Msg", (), {"payload": b"task"})()
            await asyncio.Event().wait()

        return one_task()


class _ResultAgent(Agent):
    """Its task handler publishes a result (the publish that swallows the cancel)."""

    async def handle(self, client: Any, payload: bytes) -> None:
        await client.publish(self.result_topic, b"result", qos=1)


def _cfg() -> AgentConfig:
    return AgentConfig(run="r-cancel", device="dev01", broker_host="127.0.0.1", broker_port=1,
                       username="u", password="p")


async def _ends_cancelled(task: asyncio.Task, within_s: float = 2.0) -> None:
    done, _ = await asyncio.wait({task}, timeout=within_s)
    if not done:
        task.cancel()  # do not leave it running if the assertion fails
        await asyncio.wait({task}, timeout=within_s)
    assert task in done, "the task went on after its cancel was swallowed"
    assert task.cancelled()


async def test_a_heartbeat_whose_publish_swallowed_the_cancel_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_mod, "HEARTBEAT_S", 0.01)
    agent = Agent(_cfg(), model=None, handlers={})
    client = _SwallowingClient(block_topic=agent.status_topic)
    beat = asyncio.ensure_future(agent._heartbeat(client))
    await asyncio.wait_for(client.blocked.wait(), 2.0)
    beat.cancel()
    await _ends_cancelled(beat)
    assert client.published == [agent.status_topic]  # it did not beat again after the cancel


async def test_an_agent_whose_result_publish_swallowed_the_cancel_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    agent = _ResultAgent(_cfg(), model=None, handlers={})
    client = _SwallowingClient(block_topic=agent.result_topic)
    monkeypatch.setattr("aiomqtt.Client", lambda *a, **k: client)
    serving = asyncio.ensure_future(agent.serve())
    await asyncio.wait_for(client.blocked.wait(), 2.0)
    serving.cancel()
    await _ends_cancelled(serving)
    assert client.published == [agent.status_topic, agent.result_topic]
