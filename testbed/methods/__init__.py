"""The registry of collaboration methods: read by everyone, branched on by no one.

Each method of collaboration (how devices share one generation) is a folder here — its
plan, its messages, its edge-server orchestrator and its device handler together — and
one `MethodSpec` line below. The run owner, the CLI, the TUI, the device agent, the sweep,
the claims and the figures read this table; none of them asks which method it holds.

This module is import-light (no torch, no MQTT, no numpy): classes are named as
"module:attribute" and loaded on first use, so a front end can list the methods in
milliseconds. A plug-in outside the package (a test, a user's experiment) adds its own
line with `register(MethodSpec(...))` in a module named by TESTBED_METHODS
("pkg.module,other.module"), which every process of a run — the command, the `testbed up`
supervisor, the agent template — imports when it first reads the registry.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any

from testbed.errors import InputError

__all__ = ["MethodSpec", "Line", "METHODS", "register", "method", "methods", "load", "run_key", "line_for",
           "agent_handlers", "PAPER_RUNS", "DEVICE_ARRANGEMENTS",
           "PLUGINS_ENV"]

PLUGINS_ENV = "TESTBED_METHODS"

#: How a method's devices work together (`MethodSpec.devices`): what it means, and how a
#: summary lists the devices of a run (its `relay_order`) so that it reads that way.
DEVICE_ARRANGEMENTS: dict[str, tuple[str, Any]] = {
    "chain": ("one after another, each on its own steps", lambda d: " -> ".join(d)),
    "head-tail": ("a head and a tail, both at every step",
                  lambda d: ", ".join(f"{role} {dev}" for role, dev in zip(("head", "tail"), d))),
    "parallel": ("at once, one band of the latent each", lambda d: " + ".join(d) + " at once"),
}


@dataclass(frozen=True)
class Line:
    """How one compared run looks in tables and figures."""

    label: str
    color: str
    marker: str


@dataclass(frozen=True)
class MethodSpec:
    """One collaboration method, listed once.

    `strategy`: "module:Class" of its `Collaboration` (plan + execute, methods/base.py);
    `agent_handler`: "module:factory" of its device-side task handler, factory(agent) ->
    async handler(client, payload); `largest_message`: "module:function" giving, for an
    image resolution in px, the largest message it sends (None: the workload's latent
    payload); `recovers`: a selected device may fail mid-run (`--fail`) and the run goes on;
    `own_selector`: how it picks devices when it takes no device selector (dp, random, ...),
    e.g. "best-pair" — None for a method that takes one; `lines`: its look in tables and
    figures, by selector ("*": any selector); `devices`: how its devices work together, a key
    of DEVICE_ARRANGEMENTS ("chain", "head-tail", "parallel"); `takes_confidence`: its plan keeps
    P(latency <= T_max) >= `--confidence P` under the modelled stage distributions
    (PlanContext.confidence); a method without it is refused a confidence
    (`check_confidence`), its `notes["confidence"]` says why.
    """

    name: str
    summary: str
    strategy: str
    agent_handler: str
    recovers: bool
    lines: dict[str, Line]
    own_selector: str | None = None
    largest_message: str | None = None
    notes: dict[str, str] = field(default_factory=dict)
    devices: str = "chain"
    takes_confidence: bool = False

    def __post_init__(self) -> None:
        if self.devices not in DEVICE_ARRANGEMENTS:
            raise InputError(f"method {self.name!r}: devices={self.devices!r}; "
                             f"use one of {', '.join(DEVICE_ARRANGEMENTS)}")

    def describe_devices(self, devices: list[str]) -> str:
        """A run's devices as this method uses them: "dev09 -> dev18" for a chain, "head
        dev17, tail dev09" for a pair, "dev01 + dev18 at once" for bands in parallel."""
        return DEVICE_ARRANGEMENTS[self.devices][1](list(devices))

    def line(self, selector: str) -> Line:
        got = self.lines.get(selector) or self.lines.get("*")
        if got is None:
            first = next(iter(self.lines.values()))
            return Line(f"{first.label} ({selector})", first.color, first.marker)
        return got

    def strategy_class(self) -> type:
        return load(self.strategy)

    def make(self, selector: str | None = None, **options: Any) -> Any:
        """The method's Collaboration object; a method with its own device choice takes no selector."""
        cls = self.strategy_class()
        if self.own_selector is not None:
            if selector not in (None, self.own_selector):
                raise InputError(f"--method {self.name} picks its own devices ({self.own_selector}); "
                                 f"--selector {selector} applies to methods that take one "
                                 f"({', '.join(m.name for m in methods() if m.own_selector is None)})")
            return cls(**options)
        return cls(selector or "dp", **options)

    def selector_for(self, selector: str | None) -> str:
        """The selector a run of this method records: its own choice, or the one asked for."""
        return self.own_selector or selector or "dp"

    def check_confidence(self, confidence: float | None, option: str = "--confidence") -> None:
        """InputError (exit 2) for a confidence outside (0, 1), or for a method that cannot keep one."""
        if confidence is None:
            return
        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
            raise InputError(f"{option} {confidence!r}: a probability strictly between 0 and 1, e.g. {option} 0.9")
        if not self.takes_confidence:
            raise InputError(f"{option} applies to methods that plan under it "
                             f"({', '.join(m.name for m in methods() if m.takes_confidence)}); {self.name}: "
                             f"{self.notes.get('confidence', 'it plans on the mean model only')}")

    def largest_message_bytes(self, resolution_px: int) -> int | None:
        return load(self.largest_message)(resolution_px) if self.largest_message else None


def load(where: str) -> Any:
    """The object that "package.module:attr" names."""
    module, _, attr = where.partition(":")
    return getattr(importlib.import_module(module), attr)


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method (a plug-in's one line). A name is registered once."""
    if spec.name in METHODS and METHODS[spec.name] != spec:
        raise InputError(f"method {spec.name!r} is registered already ({METHODS[spec.name].strategy})")
    METHODS[spec.name] = spec
    return spec


#: The built-in methods, in the order tables and figures list them.
for _spec in (
    MethodSpec("multistage", "the paper's relay: a chain of devices, K denoising steps each, under T_max and E_max",
               strategy="testbed.methods.multistage.strategy:Multistage",
               agent_handler="testbed.methods.multistage.agent:task_handler", recovers=True, takes_confidence=True,
               lines={"dp": Line("multi-stage w/ DS", "#1f77b4", "o"),
                      "random": Line("multi-stage w/o DS", "#2ca02c", "s"), "*": Line("multi-stage", "#17becf", "v")}),
    MethodSpec("split", "the two-segment UNet baseline: features cross the links at every step",
               strategy="testbed.methods.split.strategy:Split", agent_handler="testbed.methods.split.agent:task_handler",
               recovers=False, own_selector="best-pair", lines={"*": Line("split", "#d62728", "^")},
               devices="head-tail", largest_message="testbed.methods.split.sizes:largest_message_bytes",
               notes={"recovery": "split inference has no checkpoint a third device could continue from",
                      "confidence": "it picks its pair on the point model of its per-step messages (no stage "
                                    "distributions)"}),
    MethodSpec("patch", "row bands of the latent on N devices at once (docs/patch.md)",
               strategy="testbed.methods.patch.strategy:Patch", agent_handler="testbed.methods.patch.agent:task_handler",
               recovers=False, own_selector="best-bands", lines={"*": Line("patch", "#9467bd", "D")},
               devices="parallel",
               notes={"recovery": "a band has no other owner (no takeover, docs/reliability.md)",
                      "confidence": "its bands run at once, each step waiting for the slowest (no chance-"
                                    "constrained plan for that yet)"}),
):
    register(_spec)

#: The paper's compared runs (section IV): multi-stage with device selection (w/ DS), without
#: (w/o DS), and its baseline, split diffusion. Its claims (experiments/claims.py) and the
#: figures' notes name these roles, not methods.
PAPER_RUNS = {"ds": "multistage:dp", "no_ds": "multistage:random", "baseline": "split"}

_plugins_loaded = False


def _load_plugins() -> None:
    """Import the plug-in modules TESTBED_METHODS names (once per process)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for name in filter(None, (p.strip() for p in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise InputError(f"{PLUGINS_ENV}: cannot import method plug-in {name!r} ({e})") from None


def methods() -> list[MethodSpec]:
    """Every registered method, built-in ones first."""
    _load_plugins()
    return list(METHODS.values())


def method(name: str) -> MethodSpec:
    """The method called `name`, or an error that lists the others."""
    _load_plugins()
    spec = METHODS.get(name)
    if spec is None:
        raise InputError(f"--method {name!r}: use one of {', '.join(METHODS)}")
    return spec


def agent_handlers() -> dict[str, str]:
    """What a device's agent serves: method -> "module:factory" of its task handler."""
    return {m.name: m.agent_handler for m in methods()}


def run_key(method_name: str, selector: str) -> str:
    """How sweeps and claims name one compared run: `multistage:dp`, or `split` for a
    method with its own device choice."""
    spec = method(method_name)
    return method_name if spec.own_selector is not None else f"{method_name}:{selector}"


def line_for(method_name: str, selector: str) -> Line:
    return method(method_name).line(selector)
