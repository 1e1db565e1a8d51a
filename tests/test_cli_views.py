"""What the emulation commands print: delay and loss per link (status, validate, fault),
what each number is, `status` with no run or several, `down` in words. Pure: the status
command runs in-process on state documents, with the run listing replaced."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

import testbed.cli.commands.emulation_cmds as emulation_cmds
import testbed.emulation.runs as runs
from testbed.cli.app import main
from testbed.cli.views import describe_removed, impairment_cells, link_sentence, runs_table, status_table
from testbed.model.impairments import LinkImpairment, Impairment

# A state.json as the supervisor writes it (trimmed to what status reads): dev02 has a
# 5 % loss fault and the radio model's delay, dev01 nothing.
STATE = {
    "run": "tview", "backend": "netns", "netem": False, "topology": "paper-radio", "up_s": 3.2,
    "impairments": {"path": "nfqueue+iptables", "devices": {
        "dev02": LinkImpairment(Impairment(6.38, 0, 5.0), Impairment(5.19, 0, 5.0)).to_json()}},
    "cell": {"shared_capacity": True},
    "broker": {"kind": "mosquitto", "host": "198.18.0.1", "port": 1883},
    "nodes": [
        {"id": "server", "role": "server", "netns": "tb-tview-server", "address": "198.18.0.1",
         "rate_up_mbps": None, "rate_down_mbps": None, "cpu_quota_cores": None},
        {"id": "dev01", "role": "device", "netns": "tb-tview-dev01", "address": "198.18.1.1", "agent_online": True,
         "rate_up_mbps": 95.4, "rate_down_mbps": 114.8, "cpu_quota_cores": 0.5},
        {"id": "dev02", "role": "device", "netns": "tb-tview-dev02", "address": "198.18.1.2", "agent_online": True,
         "rate_up_mbps": 15.1, "rate_down_mbps": 24.9, "cpu_quota_cores": 0.25},
    ],
}


def _text(renderable) -> str:
    console = Console(width=200, record=True)
    console.print(renderable)
    return console.export_text()


def test_impairment_cells_show_both_directions_where_they_differ():
    assert impairment_cells(None) == ("0", "0")
    assert impairment_cells(LinkImpairment.symmetric(4.84, 0, 0.000472).to_json()) == ("4.8", "0.00")
    assert impairment_cells(LinkImpairment(Impairment(6.38, 0, 0.026), Impairment(5.19, 0, 0.0018)).to_json()) \
        == ("6.4/5.2", "0.03/0.00")
    assert impairment_cells(LinkImpairment.symmetric(20, 2, 1).to_json()) == ("20.0 ±2.0", "1.00")


def test_status_table_has_delay_and_loss_per_link_and_says_what_the_numbers_are():
    text = _text(status_table(STATE))
    assert "delay ms" in text and "loss %" in text
    dev02 = next(line for line in text.splitlines() if "dev02" in line)
    assert "6.4/5.2" in dev02 and "5.00" in dev02
    dev01 = next(line for line in text.splitlines() if "dev01" in line)
    assert "95.4" in dev01 and "114.8" in dev01
    assert "delay/loss path: nfqueue+iptables" in text
    assert "emulated" in text  # the caption: what the numbers are


def test_link_sentence_after_a_fault():
    s = link_sentence("dev03", LinkImpairment.symmetric(4.8, 0, 5).to_json(), "nfqueue+iptables")
    assert s.startswith("dev03's link now: delay 4.8 ms, loss 5.00 %") and "nfqueue+iptables" in s


def test_down_says_what_it_removed_in_words():
    items = ["supervisor 812", "process 901", "process 902", "link tbtviewh", "netns tb-tview-server",
             "netns tb-tview-dev01", "cgroup testbed/tview", "state /run/testbed/tview"]
    s = describe_removed([*items, "netns tb-tview-dev01"])  # counted once
    assert s == ("its supervisor (with it the agents and the broker), 2 processes, 2 network namespaces (with their "
                 "shaped links and delay rules), the host link, its cgroup, its state directory")
    assert describe_removed(["network tb-tview", "container tb-tview-dev01", "container tb-tview-dev02"]) \
        .startswith("2 containers (with their shaped links and delay rules), a docker network")


@pytest.fixture
def no_root_needed(monkeypatch):
    monkeypatch.setattr(emulation_cmds, "require_root", lambda: None)


def _status(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(["status", *args])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_status_without_a_run_says_so_and_exits_0(no_root_needed, monkeypatch, capsys):
    monkeypatch.setattr(runs, "known_runs", lambda: [])
    code, out, _ = _status(capsys)
    assert code == 0 and "no run is up" in out and "testbed up FILE" in out
    code, out, _ = _status(capsys, "--json")
    assert code == 0 and json.loads(out) == {"runs": []}


def test_status_with_two_runs_lists_them(no_root_needed, monkeypatch, capsys):
    states = {"ra": STATE | {"run": "ra"}, "rb": None}
    monkeypatch.setattr(runs, "known_runs", lambda: ["ra", "rb"])
    monkeypatch.setattr(runs, "read_state", lambda r, name="state.json": states[r])
    monkeypatch.setattr(runs, "supervisor_pid", lambda r: 42 if r == "ra" else None)
    code, out, _ = _status(capsys)
    assert code == 0
    assert "2 runs on this host" in out
    ra = next(line for line in out.splitlines() if " ra " in line)
    assert "up" in ra and "netns" in ra and "paper-radio" in ra and " 2 " in ra  # 2 devices
    assert "leftovers" in next(line for line in out.splitlines() if " rb " in line)
    code, out, _ = _status(capsys, "--json")
    listed = json.loads(out)["runs"]
    assert [r["run"] for r in listed] == ["ra", "rb"] and listed[0]["devices"] == 2


def test_status_of_an_unknown_run_is_bad_input(no_root_needed, monkeypatch, capsys):
    monkeypatch.setattr(runs, "known_runs", lambda: ["ra"])
    code, _, err = _status(capsys, "--run", "zz")
    assert code == 2 and "no such run" in err and "ra" in err


def test_status_of_one_run_prints_its_table(no_root_needed, monkeypatch, capsys):
    monkeypatch.setattr(runs, "known_runs", lambda: ["tview"])
    monkeypatch.setattr(runs, "read_state", lambda r, name="state.json": STATE if name == "state.json" else None)
    monkeypatch.setattr(runs, "supervisor_pid", lambda r: 42)
    code, out, _ = _status(capsys)
    assert code == 0 and "run tview (netns)" in out and "6.4/5.2" in out


def test_runs_table_renders_missing_fields_as_dashes():
    text = _text(runs_table([{"run": "rz", "state": "starting"}]))
    assert "rz" in text and "starting" in text and "-" in text
