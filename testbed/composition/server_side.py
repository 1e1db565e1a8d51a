"""The edge server's own work: its fp32 model and the MS-SSIM references, loaded in the background.

The model loads as soon as the run owner starts (a cold run overlaps it with the cell and
the agent template); each workload's reference image (fp32, the same prompt and seed,
`reference_steps`) is made after the model (diffusers' lazy imports are not safe from two
threads at once) and kept per workload; quality.reference_image also caches it on disk,
so a later process reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import numpy as np

from testbed.composition.startup import StartupClock
from testbed.errors import RunFailedError
from testbed.model.topology import Topology

__all__ = ["ServerSide"]


class ServerSide:
    def __init__(self) -> None:
        self._model: asyncio.Future | None = None
        self._references: dict[tuple, asyncio.Future] = {}

    def start(self, topo: Topology, clock: StartupClock) -> None:
        """Load the model (once) and make `topo`'s reference after it, in the background."""
        if self._model is None:
            from testbed.relay.stage import StageModel

            def load() -> Any:
                with clock.span("server_model"):
                    return StageModel.load(topo.workload.model, "fp32")

            self._model = asyncio.ensure_future(asyncio.to_thread(load))
        self.reference(topo, clock)

    async def model(self) -> Any:
        """The edge server's fp32 model (relay/stage.py StageModel)."""
        if self._model is None:
            raise RunFailedError("the edge server's model was never started")
        return await self._model

    def loaded(self) -> Any:
        """The model, once it has loaded (the result document reads its size)."""
        if self._model is None or not self._model.done() or self._model.exception() is not None:
            raise RunFailedError("the edge server's model did not load")
        return self._model.result()

    def reference(self, topo: Topology, clock: StartupClock) -> asyncio.Future:
        """The MS-SSIM reference of `topo`'s workload (its time on `clock`)."""
        wl = topo.workload
        key = (wl.model, wl.prompt, topo.seed, wl.reference_steps, wl.scheduler)
        if key not in self._references:
            def make() -> np.ndarray:
                from testbed.diffusion.quality import reference_image  # (torch: off this loop's thread)

                with clock.span("reference"):
                    return reference_image(wl.model, wl.prompt, topo.seed, steps=wl.reference_steps,
                                           scheduler_kind=wl.scheduler)

            async def after_model() -> np.ndarray:
                if self._model is not None:
                    with contextlib.suppress(Exception):  # its failure is reported where the model is needed
                        await self._model
                return await asyncio.to_thread(make)

            self._references[key] = asyncio.ensure_future(after_model())
        return self._references[key]

    async def close(self) -> None:
        for task in (self._model, *self._references.values()):
            if task is not None:
                with contextlib.suppress(BaseException):
                    await task  # a thread cannot be cancelled: wait for it, ignore its outcome
