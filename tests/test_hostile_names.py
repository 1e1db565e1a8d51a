"""Hostile topology names and device ids, for every command that takes a topology file
(validate, select, run, up, compose, sweep, tui): each exits 2 with a message that names
the file, the line and the field, before any root, Docker or resource check (the tests
pretend not to be root and point DOCKER_HOST nowhere, which would be exit 4), and a
snapshot of the surrounding directories shows nothing created or removed."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import yaml

from testbed.cli import main

HOSTILE = {
    "slash": "a/b",
    "dotdot": "..",
    "dot": ".",
    "empty": "",
    "300-chars": "a" * 300,
    "space": "a b",
    "non-ascii": "müller",
    "command": "$(touch {tmp}/pwned)",
    "leading-dash": "-rf",
    "traversal": "../victim",
    "absolute": "{tmp}/abs-target",
    "newline": "ok\n",
}

# {file}: the topology, {run}: a fresh run id; run and sweep write under the cwd by default
COMMANDS = {
    "validate": ["validate", "{file}"],
    "select": ["select", "{file}"],
    "run": ["run", "{file}", "--run", "{run}"],
    "up": ["up", "{file}", "--run", "{run}", "--backend", "docker"],
    "compose": ["compose", "{file}", "--out-dir", "out/compose"],
    "sweep": ["sweep", "{file}", "--quick"],
    "tui": ["tui", "{file}"],
}

FIELDS = {
    "name": ("name", lambda doc, v: doc.__setitem__("name", v)),
    "device id": ("devices.list[0].id", lambda doc, v: doc["devices"]["list"].__setitem__(0, {"id": v})),
}


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every path below `root` (not following symlinks) -> (kind, size)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = p.lstat()
            out[str(p.relative_to(root))] = ("dir" if p.is_dir() else "file", 0 if p.is_dir() else st.st_size)
    return out


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp/work (the cwd, with an output directory holding an earlier compose state) beside
    tmp/victim (must survive); not root; no docker daemon reachable."""
    work = tmp_path / "work"
    (work / "out" / "compose" / "small").mkdir(parents=True)
    (work / "out" / "compose" / "small" / "earlier.json").write_text("{}")
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "keep.txt").write_text("precious")
    monkeypatch.chdir(work)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    return tmp_path


@pytest.mark.parametrize("field", sorted(FIELDS))
@pytest.mark.parametrize("value_key", sorted(HOSTILE))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_hostile_name_exits_2_and_touches_nothing(workspace: Path, topologies: Path, capsys, command: str,
                                                 value_key: str, field: str) -> None:
    tmp = workspace
    value = HOSTILE[value_key].format(tmp=tmp)
    doc = yaml.safe_load((topologies / "small.yaml").read_text())
    loc, put = FIELDS[field]
    put(doc, value)
    file = tmp / "topo.yaml"
    file.write_text(yaml.safe_dump(doc, sort_keys=False))
    run = "h" + uuid.uuid4().hex[:6]
    before = _snapshot(tmp)

    argv = [a.format(file=file, run=run) for a in COMMANDS[command]]
    with pytest.raises(SystemExit) as e:
        main(argv)
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())  # rich wraps long lines

    assert e.value.code == 2, (argv, captured.err)
    assert "Traceback" not in err
    assert err.startswith(f"error: {file}:") and f" {loc}: " in err, err  # file, line, field
    assert "letters, digits or '-'" in err, err  # the rule, i.e. the fix
    assert _snapshot(tmp) == before  # nothing created or removed, inside or beside the output directory
    assert not Path(f"/run/testbed/{run}").exists()
    assert not (tmp / "pwned").exists() and not (tmp / "abs-target").exists()
    assert (tmp / "victim" / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("value", ["A", "0", "paper-2", "x" * 32, "Dev-01"])
def test_names_within_the_rule_are_accepted(tmp_path: Path, topologies: Path, value: str) -> None:
    from testbed.model.topology import load_topology

    doc = yaml.safe_load((topologies / "small.yaml").read_text())
    doc["name"] = value
    doc["devices"]["list"][0]["id"] = value
    file = tmp_path / "t.yaml"
    file.write_text(yaml.safe_dump(doc))
    topo = load_topology(file)
    assert topo.name == value and topo.devices.list[0].id == value


def test_device_ids_differing_only_in_case_are_refused(tmp_path: Path) -> None:
    """They would be one DNS name in a compose or Swarm network."""
    file = tmp_path / "t.yaml"
    file.write_text("devices:\n  list:\n    - {id: dev01}\n    - {id: DEV01}\n")
    with pytest.raises(SystemExit) as e:
        main(["validate", str(file)])
    assert e.value.code == 2


def test_compose_replaces_its_own_state_but_never_a_users_directory_or_a_symlinked_target(
        tmp_path: Path, topologies: Path, capsys) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["compose", str(topologies / "small.yaml"), "--out-dir", str(out), "--json"])
    assert e.value.code == 0
    (out / "small" / "stale.txt").write_text("from the first compose")
    with pytest.raises(SystemExit) as e:  # again: its own earlier state is replaced
        main(["compose", str(topologies / "small.yaml"), "--out-dir", str(out), "--json"])
    assert e.value.code == 0 and not (out / "small" / "stale.txt").exists()
    assert (out / "small" / "agents" / "dev01.json").exists()

    # <name>.yml a symlink to a file elsewhere: replaced, the target untouched
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / "small.yml").unlink()
    (out / "small.yml").symlink_to(victim)
    with pytest.raises(SystemExit) as e:
        main(["compose", str(topologies / "small.yaml"), "--out-dir", str(out), "--json"])
    assert e.value.code == 0 and victim.read_text() == "precious" and not (out / "small.yml").is_symlink()

    # a directory the user made where the state would go: exit 4, left as it is
    other = tmp_path / "other"
    (other / "small").mkdir(parents=True)
    (other / "small" / "notes.txt").write_text("mine")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["compose", str(topologies / "small.yaml"), "--out-dir", str(other)])
    assert e.value.code == 4
    assert "not made by the testbed" in " ".join(capsys.readouterr().err.split())
    assert (other / "small" / "notes.txt").read_text() == "mine" and not (other / "small.yml").exists()


@pytest.mark.parametrize("argv", [["run", "{small}", "--run", "../../x"], ["tui", "--attach", "../x"],
                                  ["tui", "{small}", "--attach", "a/b"], ["down", "--run", "../etc"],
                                  ["up", "{small}", "--run", "UP"], ["compose", "{small}", "--run", "-rf"]])
def test_run_ids_from_the_command_line_exit_2_before_any_path_is_built(workspace: Path, topologies: Path, capsys,
                                                                       argv: list[str]) -> None:
    before = _snapshot(workspace)
    with pytest.raises(SystemExit) as e:
        main([a.format(small=topologies / "small.yaml") for a in argv])
    err = " ".join(capsys.readouterr().err.split())
    assert e.value.code == 2 and "run id" in err and "Traceback" not in err, err
    assert _snapshot(workspace) == before
