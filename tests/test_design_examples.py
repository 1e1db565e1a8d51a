"""docs/design.md shows real code: every ```python block there runs, from the repository's
root, in a fresh namespace (a block that no longer matches the code fails here)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "design.md").read_text(), re.S)


def test_the_design_page_has_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_a_design_example_runs(code, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "path", list(sys.path))  # a block may add tests/ to the path
    exec(compile(code, "docs/design.md", "exec"), {"__name__": "design_example"})
