"""The corpus of malformed topologies (tests/corpus/topologies/, expected messages in its
expect.json): each one is an exit-2 error on one line that names the file, the line and the
field — through the real CLI entry point, without a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed.cli import main

CORPUS = Path(__file__).resolve().parent / "corpus" / "topologies"
EXPECT = json.loads((CORPUS / "expect.json").read_text())


def test_every_corpus_file_has_an_expectation():
    assert sorted(p.name for p in CORPUS.glob("*.yaml")) == sorted(EXPECT)


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_malformed_topology_exits_2_with_a_located_message(name, capsys):
    path = CORPUS / name
    with pytest.raises(SystemExit) as e:
        main(["validate", str(path)])
    captured = capsys.readouterr()
    assert e.value.code == 2, captured
    err = " ".join(captured.err.split())  # rich wraps long lines
    assert "Traceback" not in err and captured.out == ""
    assert err.startswith(f"error: {path}"), err
    assert " ".join(EXPECT[name].split()) in err, err
