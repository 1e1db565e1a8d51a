"""Topology description: pydantic models of the YAML, the loader, and seeded placement.

Pure data: nothing here touches the kernel. `load_topology()` validates a
file once and reports errors with file, line and field path; `place()` turns the
description into concrete devices (position, profile, precision) from the seed.
"""

from __future__ import annotations

import builtins
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from testbed.errors import InputError, TopologyError
from testbed.model.names import NAME_RE, NAME_RULE, RESERVED_IDS
from testbed.model.profiles import PRECISIONS, load_profiles

__all__ = [
    "Area",
    "Position",
    "ServerSpec",
    "DeviceSpec",
    "DevicePool",
    "RadioConfig",
    "WorkloadConfig",
    "Budgets",
    "CellConfig",
    "MobilityConfig",
    "FaultSpec",
    "LinkOverride",
    "LinksConfig",
    "Bound",
    "Topology",
    "PlacedDevice",
    "Placement",
    "load_topology",
    "parse_topology",
    "place",
    "derive_rng",
    "topology_json_schema",
]



def _checked_name(value: str) -> str:
    # names.NAME_RE is the one rule; the message names the fix (the loader adds file:line field)
    if not NAME_RE.fullmatch(value):
        raise ValueError(f"{NAME_RULE}; it names files, namespaces and containers")
    return value


#: A topology name or device id: checked against names.NAME_RE before anything uses it.
Name = Annotated[str, AfterValidator(_checked_name), Field(json_schema_extra={"pattern": NAME_RE.pattern})]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Area(_Model):
    """The cell: a rectangle with the origin in a corner."""

    width_m: PositiveFloat = 500.0
    height_m: PositiveFloat = 500.0


class Position(_Model):
    x_m: NonNegativeFloat
    y_m: NonNegativeFloat


class ServerSpec(_Model):
    """The edge server (base station + MQTT broker + orchestrator). Default: cell centre."""

    position: Position | None = None
    profile: str = "edge-server-a5000"


DelayMs = Annotated[float, Field(ge=0, le=10_000, allow_inf_nan=False)]
LossPct = Annotated[float, Field(ge=0, lt=100, allow_inf_nan=False)]


class LinkOverride(_Model):
    """A device's own link impairments (`link:`); a field left out keeps the cell's value."""

    delay_ms: DelayMs | None = Field(None, description="one-way delay added in each direction, ms")
    jitter_ms: DelayMs | None = Field(None, description="uniform jitter +- around the delay, ms (<= delay_ms)")
    loss_pct: LossPct | None = Field(None, description="random packet loss per direction, %")


class LinksConfig(_Model):
    """Cell-wide link impairments (`links:`), added in each direction of every device link
    (RTT grows by 2 x delay_ms); `impairments: radio` derives delay and loss from each
    link's SNR instead (docs/links.md). No `links:` block: no impairments."""

    impairments: Literal["fixed", "radio"] = "fixed"
    delay_ms: DelayMs = Field(0.0, description="one-way delay added in each direction, ms")
    jitter_ms: DelayMs = Field(0.0, description="uniform jitter +- around the delay, ms (<= delay_ms)")
    loss_pct: LossPct = Field(0.0, description="random packet loss per direction, %")

    @model_validator(mode="after")
    def _consistent(self) -> LinksConfig:
        if self.impairments == "radio":
            given = [k for k in ("delay_ms", "jitter_ms", "loss_pct") if k in self.model_fields_set]
            if given:
                raise ValueError(f"{', '.join(given)}: with impairments: radio, delay and loss come from each "
                                 "link's SNR; remove them or set impairments: fixed (a device's link: still overrides)")
        elif self.jitter_ms > self.delay_ms:
            raise ValueError(f"jitter_ms={self.jitter_ms:g} exceeds delay_ms={self.delay_ms:g}; "
                             "the delay would go negative: lower jitter_ms or raise delay_ms")
        return self


class DeviceSpec(_Model):
    """One explicitly listed device; omitted fields are drawn like a pool device's."""

    id: Name
    profile: str | None = None
    precision: str | None = None
    position: Position | None = None
    link: LinkOverride | None = None
    placement: Name | None = Field(None, description="the cluster node it runs on in a Swarm cell (`n2`: the node's "
                                   "testbed.node label); omitted: spread over the nodes")


class DevicePool(_Model):
    """Devices: an explicit `list`, plus `count` more drawn from the mixes with the seed."""

    count: Annotated[int, Field(ge=0, le=5000)] = 0
    profiles: dict[str, PositiveFloat] = Field(
        default_factory=lambda: {"jetson-agx-xavier": 1.0, "jetson-agx-orin": 1.0},
        description="profile name -> relative weight of the random mix",
    )
    precisions: builtins.list[str] = Field(
        default_factory=lambda: builtins.list(PRECISIONS),
        description="precisions assigned uniformly at random",
    )
    min_distance_m: NonNegativeFloat = Field(
        10.0, description="no device closer than this to the server (3GPP UMi holds from 10 m)"
    )
    list: builtins.list[DeviceSpec] = Field(default_factory=builtins.list)

    @field_validator("profiles")
    @classmethod
    def _profiles_nonempty(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("must name at least one profile, e.g. {jetson-agx-orin: 1}")
        return v

    @field_validator("precisions")
    @classmethod
    def _precisions_known(cls, v: builtins.list[str]) -> builtins.list[str]:
        if not v:
            raise ValueError(f"must list at least one of {', '.join(PRECISIONS)}")
        for p in v:
            if p not in PRECISIONS:
                raise ValueError(f"unknown precision {p!r}; valid: {', '.join(PRECISIONS)}")
        return v

    @model_validator(mode="after")
    def _nonempty(self) -> DevicePool:
        if self.count == 0 and not self.list:
            raise ValueError("no devices: set devices.count > 0 or give devices.list entries")
        ids = [d.id.lower() for d in self.list]  # DNS names (compose services) ignore case
        dupes = sorted({d.id for d in self.list if ids.count(d.id.lower()) > 1})
        if dupes:
            raise ValueError(f"duplicate device ids {dupes}; every id must be unique (ignoring case)")
        return self


class RadioConfig(_Model):
    """Radio model parameters; defaults follow 3GPP TR 38.901 UMi-Street-Canyon at 3.5 GHz."""

    model: Literal["umi-street-canyon", "free-space", "log-distance"] = "umi-street-canyon"
    los: Literal["probabilistic", "los", "nlos"] = "probabilistic"
    carrier_ghz: Annotated[float, Field(gt=0.5, le=100)] = 3.5
    bandwidth_mhz: Annotated[float, Field(gt=0, le=400)] = 20.0
    device_tx_power_dbm: Annotated[float, Field(ge=-30, le=40)] = 23.0
    server_tx_power_dbm: Annotated[float, Field(ge=-30, le=60)] = 30.0
    device_noise_figure_db: Annotated[float, Field(ge=0, le=30)] = 9.0
    server_noise_figure_db: Annotated[float, Field(ge=0, le=30)] = 5.0
    bs_height_m: Annotated[float, Field(gt=1.0, le=150)] = 10.0
    ut_height_m: Annotated[float, Field(ge=1.0, le=22.5)] = 1.5
    shadowing: bool = False
    rate_cap_mbps: PositiveFloat | None = None
    pathloss_exponent: Annotated[float, Field(ge=1.5, le=6)] = 3.0
    reference_distance_m: PositiveFloat = 1.0

    @model_validator(mode="after")
    def _heights(self) -> RadioConfig:
        if self.ut_height_m >= self.bs_height_m:
            raise ValueError(
                f"ut_height_m={self.ut_height_m} must be below bs_height_m={self.bs_height_m}"
            )
        return self


class WorkloadConfig(_Model):
    """What is generated: the model, its resolution, K steps per stage, the relayed payload."""

    model: str = Field(
        "tiny",
        description="what the devices run: 'tiny' or 'digits' (embedded), 'sd15' (local weights) or a model directory; "
        "profile step times are always SD1.5's at resolution_px",
    )
    resolution_px: Literal[256, 512] = 256
    steps_per_stage: Annotated[int, Field(ge=1, le=1000)] = 5
    payload_bytes: Annotated[int, Field(ge=1, le=64 * 2**20)] = 262144
    prompt: str = "a handwritten 7"
    compute: Literal["profile", "real"] = "profile"
    scheduler: Literal["ddim", "euler", "dpm", "pndm"] = "ddim"
    reference_steps: Annotated[int, Field(ge=1, le=1000)] = 50

    @model_validator(mode="after")
    def _prompt_drawable(self) -> WorkloadConfig:
        from testbed.model.prompts import check_prompt

        try:
            check_prompt(self.model, self.prompt)
        except InputError as e:
            raise _located(("prompt",), str(e)) from None
        return self


class Budgets(_Model):
    t_max_s: PositiveFloat = 2.0
    e_max_j: PositiveFloat = 200.0
    #: share of each budget a plan leaves unused for what the cost model cannot predict
    #: (selection/costs.py planning_budgets); runs are still judged against the full budgets
    margin_pct: Annotated[float, Field(ge=0, le=20)] = 0.0


class CellConfig(_Model):
    """Shared air: a parent HTB class per direction caps the sum of all device rates."""

    shared_capacity: bool = False
    capacity_up_mbps: PositiveFloat | None = None
    capacity_down_mbps: PositiveFloat | None = None


class MobilityConfig(_Model):
    model: Literal["random-waypoint"] = "random-waypoint"
    speed_mps: PositiveFloat = 1.5
    pause_s: NonNegativeFloat = 0.0
    interval_s: Annotated[float, Field(ge=0.05)] = 1.0


class FaultSpec(_Model):
    """A fault injected during a run (see the README's fault section)."""

    kind: Literal["kill", "broker-restart", "link-flap", "rate-drop", "slow", "delay", "loss"]
    device: Name | None = None
    at_s: NonNegativeFloat | None = None
    at_stage: Annotated[int, Field(ge=0)] | None = None
    duration_s: PositiveFloat | None = None
    value: PositiveFloat | None = None

    @model_validator(mode="after")
    def _consistent(self) -> FaultSpec:
        if self.at_s is not None and self.at_stage is not None:
            raise ValueError("give at_s (seconds after the relay starts) or at_stage (stage index), not both")
        if self.kind == "broker-restart" and self.device is not None:
            raise ValueError("broker-restart takes no device (the broker runs on the edge server)")
        if self.kind == "kill" and self.duration_s is not None:
            raise ValueError("kill takes no duration_s (a killed agent stays dead)")
        if self.value is not None and self.kind not in ("rate-drop", "slow", "delay", "loss"):
            raise ValueError(f"{self.kind} takes no value (only rate-drop: Mbit/s, slow: CPU cores, "
                             "delay: ms one way, loss: %)")
        if self.kind == "loss" and self.value is not None and self.value >= 100:
            raise ValueError(f"loss value {self.value:g} %: must be below 100 (a cut link is link-flap)")
        return self


class Bound(_Model):
    min: float | None = None
    max: float | None = None


class Topology(_Model):
    """A whole scenario: the cell, its nodes, the radio, the workload and the budgets."""

    name: Name = "unnamed"
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 1
    area: Area = Area()
    server: ServerSpec = ServerSpec()
    devices: DevicePool
    radio: RadioConfig = RadioConfig()
    workload: WorkloadConfig = WorkloadConfig()
    budgets: Budgets = Budgets()
    cell: CellConfig = CellConfig()
    mobility: MobilityConfig | None = None
    links: LinksConfig | None = None
    faults: list[FaultSpec] = Field(default_factory=list)
    expect: dict[str, Bound] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _cross_checks(self) -> Topology:
        profiles = load_profiles()
        if self.server.profile not in profiles:
            raise _located(("server", "profile"), _unknown("profile", self.server.profile, profiles))
        if self.server.position is not None:
            _check_inside(self.area, self.server.position, ("server", "position"))
        for name in self.devices.profiles:
            if name not in profiles:
                raise _located(("devices", "profiles", name), _unknown("profile", name, profiles))
        for i, d in enumerate(self.devices.list):
            if d.id in RESERVED_IDS:
                raise _located(("devices", "list", i, "id"), f"{d.id!r} is reserved ({', '.join(RESERVED_IDS)}); "
                               "rename the device")
            if d.profile is not None and d.profile not in profiles:
                raise _located(("devices", "list", i, "profile"), _unknown("profile", d.profile, profiles))
            if d.precision is not None and d.precision not in PRECISIONS:
                raise _located(
                    ("devices", "list", i, "precision"),
                    f"unknown precision {d.precision!r}; valid: {', '.join(PRECISIONS)}",
                )
            if d.position is not None:
                _check_inside(self.area, d.position, ("devices", "list", i, "position"))
            if d.link is not None:
                self._check_link_override(i, d.link)
        for field in ("capacity_up_mbps", "capacity_down_mbps"):
            if getattr(self.cell, field) is not None and not self.cell.shared_capacity:
                # the emulation and the plans read the capacities only when the air is shared
                raise _located(("cell", field), f"{getattr(self.cell, field):g} Mbit/s caps nothing without "
                               "`shared_capacity: true`; add `shared_capacity: true` to `cell:` (every device's "
                               f"rate then shares this capacity) or remove {field}")
        ids = _device_ids(self.devices) if self.faults else []
        for i, f in enumerate(self.faults):
            if f.device is not None and f.device not in ids:
                raise _located(("faults", i, "device"), _unknown("device", f.device, dict.fromkeys(ids)))
        return self

    def _check_link_override(self, i: int, link: LinkOverride) -> None:
        """A device's jitter may not exceed the delay it ends up with (a radio delay is at least
        the model's base delay, data/radio_links.yaml)."""
        if link.jitter_ms is None:
            return
        cell = self.links
        if link.delay_ms is not None:
            delay = link.delay_ms
        elif cell is not None and cell.impairments == "radio":
            from testbed.model.radio_links import load_radio_link_params

            delay = min(load_radio_link_params().base_delay_ms.values())
        else:
            delay = cell.delay_ms if cell is not None else 0.0
        if link.jitter_ms > delay:
            raise _located(("devices", "list", i, "link", "jitter_ms"),
                           f"{link.jitter_ms:g} exceeds this device's delay of {delay:g} ms; the delay would go "
                           "negative: lower jitter_ms or set the device's delay_ms")

    def placements(self) -> dict[str, str]:
        """Device id -> its `placement` (a Swarm cell's node), for listed devices that name one."""
        return {d.id: d.placement for d in self.devices.list if d.placement is not None}

    def link_override(self, device_id: str) -> LinkOverride | None:
        """The `link:` of a listed device (None for generated devices and devices without one)."""
        for d in self.devices.list:
            if d.id == device_id:
                return d.link
        return None

    @property
    def server_position(self) -> Position:
        return self.server.position or Position(x_m=self.area.width_m / 2, y_m=self.area.height_m / 2)


class _LocatedError(ValueError):
    """A cross-field error that knows its field path (pydantic only knows the model)."""

    def __init__(self, loc: tuple[Any, ...], msg: str):
        super().__init__(msg)
        self.loc = loc
        self.msg = msg


def _located(loc: tuple[Any, ...], msg: str) -> _LocatedError:
    return _LocatedError(loc, msg)


def _unknown(what: str, name: str, known: dict[str, Any]) -> str:
    return f"unknown {what} {name!r}; valid: {', '.join(sorted(known))}"


def _device_ids(pool: DevicePool) -> list[str]:
    """The ids `place()` gives: explicit ones, then dev01, dev02... for `count` (no draws)."""
    ids = [d.id for d in pool.list]
    taken = {i.lower() for i in ids}  # ids are unique ignoring case (DNS names)
    width, n = max(2, len(str(pool.count))), 0
    while len(ids) < len(pool.list) + pool.count:
        n += 1
        if f"dev{n:0{width}d}" not in taken:
            ids.append(f"dev{n:0{width}d}")
    return ids


def _check_inside(area: Area, pos: Position, loc: tuple[Any, ...]) -> None:
    if pos.x_m > area.width_m:
        raise _located(loc + ("x_m",), f"{pos.x_m:g} is outside the {area.width_m:g} m area")
    if pos.y_m > area.height_m:
        raise _located(loc + ("y_m",), f"{pos.y_m:g} is outside the {area.height_m:g} m area")


# ---------------------------------------------------------------------------------------
# Loading, with errors that name file, line and field path


def load_topology(path: str | Path, seed: int | None = None) -> Topology:
    """Load and validate a topology file; `seed` (the CLI's --seed) overrides the file's."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise TopologyError(f"{path}: no such file; give the path of a topology YAML (see topologies/)") from None
    except IsADirectoryError:
        raise TopologyError(f"{path}: is a directory; give the path of a topology YAML file") from None
    except OSError as e:
        raise TopologyError(f"{path}: cannot read ({e.strerror})") from None
    return parse_topology(raw, source=str(path), seed=seed)


def parse_topology(raw: bytes | str, source: str = "<topology>", seed: int | None = None) -> Topology:
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TopologyError(
                f"{source}: byte {e.start} is not UTF-8 text; a topology must be a YAML text file"
            ) from None
    else:
        text = raw
    if "\x00" in text:
        raise TopologyError(f"{source}: contains NUL bytes; a topology must be a YAML text file")
    if not text.strip():
        raise TopologyError(f"{source}: the file is empty; a topology needs at least a `devices:` block")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = e.problem or str(e)
        hint = ""
        if "\t" in problem or "'\\t'" in problem:
            hint = "; YAML indentation must use spaces, not tabs"
        raise TopologyError(f"{source}{line}: YAML syntax error: {problem}{hint}") from None
    except yaml.YAMLError as e:
        raise TopologyError(f"{source}: YAML error: {e}") from None
    except RecursionError:
        raise TopologyError(f"{source}: YAML nesting is too deep; a topology is a few levels of mappings") from None
    if data is None:
        raise TopologyError(f"{source}: the file holds no YAML document; a topology needs a `devices:` block")
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"a {type(data).__name__}"
        raise TopologyError(f"{source}:1: the top level is {kind}; a topology must be a mapping (key: value)")
    if seed is not None:
        if not 0 <= seed < 2**32:
            raise TopologyError(f"--seed {seed}: must be between 0 and 4294967295")
        data["seed"] = seed
    try:
        return Topology.model_validate(data)
    except ValidationError as e:
        raise TopologyError(_format_validation(e, node, source)) from None
    except _LocatedError as e:
        raise TopologyError(_format_one(source, node, e.loc, e.msg)) from None


def _format_validation(err: ValidationError, node: yaml.Node | None, source: str) -> str:
    lines = []
    for item in err.errors():
        loc = tuple(item["loc"])
        ctx = item.get("ctx") or {}
        inner = ctx.get("error")
        if isinstance(inner, _LocatedError):
            lines.append(_format_one(source, node, loc + tuple(inner.loc), inner.msg))
            continue
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = f"unknown key {loc[-1]!r}; remove it or check its spelling"
        elif item["type"] == "missing":
            msg = "is required"
        elif "input" in item and item["type"] not in ("model_type",):
            msg = f"{_shown(item['input'])}: {msg}" if not isinstance(item["input"], (dict, list)) else msg
        lines.append(_format_one(source, node, loc, msg))
    return "\n".join(lines)


def _shown(value: Any, limit: int = 60) -> str:
    """repr of a bad value, cut when long (a 300-character name need not fill the terminal)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(str(value))} characters)"


def _format_one(source: str, node: yaml.Node | None, loc: tuple[Any, ...], msg: str) -> str:
    line = _line_of(node, loc)
    where = f"{source}:{line}" if line else source
    return f"{where} {_path_str(loc)}: {msg}" if loc else f"{where}: {msg}"


def _path_str(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][\w-]*", str(part)):
            out += ("." if out else "") + str(part)
        else:
            out += f"[{part!r}]"
    return out


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the deepest YAML node along `loc` (pydantic loc -> YAML mark)."""
    best = node.start_mark.line + 1 if node is not None else None
    cur = node
    for part in loc:
        if isinstance(cur, yaml.MappingNode):
            nxt = None
            for k, v in cur.value:
                if isinstance(k, yaml.ScalarNode) and k.value == str(part):
                    best = k.start_mark.line + 1
                    nxt = v
                    break
            if nxt is None:
                return best
            cur = nxt
        elif isinstance(cur, yaml.SequenceNode) and isinstance(part, int) and part < len(cur.value):
            cur = cur.value[part]
            best = cur.start_mark.line + 1
        else:
            return best
    if cur is not None:
        best = cur.start_mark.line + 1
    return best


def topology_json_schema() -> dict[str, Any]:
    return Topology.model_json_schema()


# ---------------------------------------------------------------------------------------
# Seeds and placement

_PURPOSES = {"placement": 1, "profiles": 2, "precisions": 3, "los": 4, "shadowing": 5, "noise": 6,
             "mobility": 7, "baseline": 8, "faults": 9}


def derive_rng(seed: int, purpose: str) -> np.random.Generator:
    """An independent RNG stream per purpose, all derived from the one scenario seed."""
    return np.random.default_rng([seed, _PURPOSES[purpose]])


class PlacedDevice(_Model):
    id: str
    profile: str
    precision: str
    x_m: float
    y_m: float


class Placement(_Model):
    seed: int
    server: Position
    devices: list[PlacedDevice]

    def by_id(self, device_id: str) -> PlacedDevice:
        for d in self.devices:
            if d.id == device_id:
                return d
        raise KeyError(device_id)


def place(topo: Topology) -> Placement:
    """Concrete devices: explicit ones first, then `count` generated ones (dev01, dev02...).

    Positions are uniform in the area, outside `min_distance_m` of the server; profiles are
    drawn by the mix weights, precisions uniformly. Each draw has its own RNG stream, so
    changing the precision list does not move the devices.
    """
    pool = topo.devices
    server = topo.server_position
    pos_rng = derive_rng(topo.seed, "placement")
    prof_rng = derive_rng(topo.seed, "profiles")
    prec_rng = derive_rng(topo.seed, "precisions")
    names = list(pool.profiles)
    weights = np.array([pool.profiles[n] for n in names], dtype=float)
    weights /= weights.sum()

    def draw_position() -> tuple[float, float]:
        if pool.min_distance_m > math.hypot(topo.area.width_m, topo.area.height_m):
            raise TopologyError(f"devices.min_distance_m={pool.min_distance_m:g} leaves no room in the area")
        for _ in range(10_000):
            x = float(pos_rng.uniform(0, topo.area.width_m))
            y = float(pos_rng.uniform(0, topo.area.height_m))
            if math.hypot(x - server.x_m, y - server.y_m) >= pool.min_distance_m:
                return round(x, 2), round(y, 2)
        raise TopologyError(f"devices.min_distance_m={pool.min_distance_m:g}: no position found in the area")

    devices: list[PlacedDevice] = []
    for spec in pool.list:
        profile = spec.profile or names[int(prof_rng.choice(len(names), p=weights))]
        precision = spec.precision or pool.precisions[int(prec_rng.integers(len(pool.precisions)))]
        if spec.position is not None:
            x, y = spec.position.x_m, spec.position.y_m
        else:
            x, y = draw_position()
        devices.append(PlacedDevice(id=spec.id, profile=profile, precision=precision, x_m=x, y_m=y))
    taken = {d.id.lower() for d in devices}  # ids are unique ignoring case (DNS names)
    width = max(2, len(str(pool.count)))
    n = 0
    while len(devices) < len(pool.list) + pool.count:
        n += 1
        dev_id = f"dev{n:0{width}d}"
        if dev_id in taken:
            continue
        profile = names[int(prof_rng.choice(len(names), p=weights))]
        precision = pool.precisions[int(prec_rng.integers(len(pool.precisions)))]
        x, y = draw_position()
        devices.append(PlacedDevice(id=dev_id, profile=profile, precision=precision, x_m=x, y_m=y))
    return Placement(seed=topo.seed, server=server, devices=devices)
