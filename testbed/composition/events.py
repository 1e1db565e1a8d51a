"""The run's one event writer: `events.jsonl`, the front end's callback, listeners and MQTT.

Events come from two places — the orchestrator (on its own event loop, in a thread inside
the edge server's namespace; it publishes them on `tb/<run>/events` itself) and the run
owner (selection, agents_online, faults, run_finished; published by `EventPublisher`).
Both go through `EventLog.record`, on the run owner's loop: written and flushed at once,
handed to `on_event` (the CLI's live table, the TUI) and to listeners (fault scheduling).
A write that fails (a full disk, an I/O error) ends the run with a ResourceError naming
the file: raised at once where the run owner emits, and at the orchestrator's next event
where the failed write was its event's (`threadsafe`) — never logged and carried on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from testbed.errors import ResourceError
from testbed.relay.events import make_event

__all__ = ["EventLog", "EventPublisher", "publishing"]

Listener = Callable[[dict[str, Any]], None]


class EventLog:
    def __init__(self, run_id: str, on_event: Listener | None = None):
        self.run_id = run_id
        self.on_event = on_event
        self.listeners: list[Listener] = []
        self._file: Any = None
        self._written: set[Path] = set()
        self.publisher: EventPublisher | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: ResourceError | None = None  # a failed write: the run ends with it

    def open(self, path: Path | None) -> None:
        """Write this generation's events to `path` (None: keep none on disk). A file this
        log wrote before is appended to: one file holds a session's generations in order."""
        self.close()
        self._loop = asyncio.get_running_loop()
        self.error = None
        if path is not None:
            mode = "a" if path in self._written else "w"
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(path, mode, buffering=1)  # noqa: SIM115 - held for the generation
            except OSError as e:
                raise ResourceError(f"cannot write the run's events to {path}: {e.strerror or e}; "
                                    "give an output directory that can be written (--out)") from None
            self._written.add(path)

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as e:  # its last line could not be flushed
                self._failed(e)
            self._file = None

    def record(self, ev: dict[str, Any]) -> None:
        """Write, then hand on, one event; a failed write (now or before) raises once the event
        is handed on (but for `run_failed`: the front end and listeners see why it ended)."""
        if self._file is not None:
            try:
                self._file.write(json.dumps(ev, default=str) + "\n")
            except OSError as e:
                self._failed(e)
        if self.on_event is not None:
            self.on_event(ev)
        for listener in list(self.listeners):
            listener(ev)
        if self.error is not None and ev.get("type") != "run_failed":
            raise self.error

    def emit(self, etype: str, device: str | None = None, **data: Any) -> dict[str, Any]:
        """An event of the run owner's own (selection, agents_online, a fault, ...)."""
        ev = make_event(etype, self.run_id, device=device, **data)
        self.record(ev)
        if self.publisher is not None:
            self.publisher.publish(ev)
        return ev

    def _failed(self, e: OSError) -> None:
        name = getattr(self._file, "name", "events.jsonl")
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        self._file = None
        self.error = ResourceError(f"cannot write the run's events to {name}: {e.strerror or e}; the run stops "
                                   "(its record would be incomplete): free space there or give another --out")

    def threadsafe(self) -> Listener:
        """`record` for an orchestrator on another thread (marshalled onto this loop). Once a
        write failed, the next call raises that error in the caller's thread: the
        orchestrator's generation ends with it."""
        loop = self._loop or asyncio.get_running_loop()

        def from_thread(ev: dict[str, Any]) -> None:
            with contextlib.suppress(ResourceError):  # kept in self.error: raised at the next event
                self.record(ev)

        def sink(ev: dict[str, Any]) -> None:
            if self.error is not None:
                raise self.error
            loop.call_soon_threadsafe(from_thread, ev)

        return sink


class EventPublisher:
    """The run owner's own MQTT client for `tb/<run>/events` (selection, agents_online,
    faults, run_finished): one connection for the generation, on an event loop inside the
    edge server's namespace, reconnecting with backoff when the broker restarts."""

    def __init__(self, host: str, port: int, username: str, password: str, run_id: str):
        self.host, self.port, self.username, self.password, self.run_id = host, port, username, password, run_id
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self.ready = asyncio.Event()

    async def serve(self, ready: Callable[[], None]) -> None:
        """Publish what `publish` hands over until `close`; call on the publishing loop."""
        import aiomqtt

        from testbed.relay import topics
        from testbed.relay.cancel import end_if_cancel_was_swallowed

        self._loop, self._queue = asyncio.get_running_loop(), asyncio.Queue()
        ready()
        pending: dict[str, Any] | None = None
        backoff = 0.2
        while True:
            try:
                async with aiomqtt.Client(self.host, self.port, username=self.username, password=self.password,
                                          identifier=f"tb-{self.run_id}-owner", keepalive=10, timeout=10) as client:
                    backoff = 0.2
                    while True:
                        ev = pending if pending is not None else await self._queue.get()
                        if ev is None:
                            return
                        pending = ev
                        await client.publish(topics.events(self.run_id), json.dumps(ev, default=str).encode(), qos=1)
                        pending = None
                        end_if_cancel_was_swallowed()
            except aiomqtt.MqttError:
                await asyncio.sleep(backoff)  # the broker is away (a restart fault): keep the event, retry
                backoff = min(backoff * 2, 2.0)

    def publish(self, ev: dict[str, Any] | None) -> None:
        if self._loop is not None and self._queue is not None:
            with contextlib.suppress(RuntimeError):  # its loop is closed: nothing left to publish to
                self._loop.call_soon_threadsafe(self._queue.put_nowait, ev)

    def close(self) -> None:
        self.publish(None)


@contextlib.asynccontextmanager
async def publishing(log: EventLog, settings: Any, in_server_ns: Callable[[Callable[[], Any]], Any],
                     ) -> AsyncIterator[None]:
    """The run owner's publisher for one generation (`settings`: relay RelaySettings, or None
    without a broker): serving on a loop in the edge server's namespace while the body runs,
    closed after it (best effort: the events are in events.jsonl in any case)."""
    if settings is None:
        yield
        return
    pub = EventPublisher(settings.broker_host, settings.broker_port, settings.username, settings.password,
                         settings.run)
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    task = asyncio.ensure_future(in_server_ns(lambda: pub.serve(lambda: loop.call_soon_threadsafe(ready.set_result,
                                                                                                    None))))
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # it failed before it could serve: say why
    log.publisher = pub
    try:
        yield
    finally:
        pub.close()
        log.publisher = None
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=10)
        except (TimeoutError, Exception):  # noqa: BLE001 - best effort: the events are in events.jsonl
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
