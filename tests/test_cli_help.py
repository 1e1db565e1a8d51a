"""Every pointer in the CLI's help (`README "Section"`, `docs/x.md`, `docs/x.md, "Section"`)
names a file and a section that exist: `run --help` sent users to a README section that
lives in docs/emulation.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main

from testbed.cli.app import app

REPO = Path(__file__).resolve().parent.parent
_README = re.compile(r'README "([^"]+)"')
_DOC = re.compile(r'(docs/[\w.-]+\.md)(?:, "([^"]+)")?')


def _help_texts(group=None, prefix: str = "") -> list[tuple[str, str]]:
    group = group or typer.main.get_command(app)
    texts = []
    for name, cmd in group.commands.items():
        texts.append((prefix + name, cmd.help or ""))
        texts += [(f"{prefix}{name} {'/'.join(p.opts)}", getattr(p, "help", None) or "") for p in cmd.params]
        if hasattr(cmd, "commands"):  # a group: `image build`, `image rm`
            texts += _help_texts(cmd, f"{prefix}{name} ")
    return texts


def _headings(path: Path) -> set[str]:
    return {m.group(1).strip() for m in re.finditer(r"^#+\s+(.*)$", path.read_text(), re.M)}


def _broken(text: str) -> list[str]:
    bad = []
    for m in _README.finditer(text):
        if m.group(1) not in _headings(REPO / "README.md"):
            bad.append(f'README has no section "{m.group(1)}"')
    for m in _DOC.finditer(text):
        doc = REPO / m.group(1)
        if not doc.is_file():
            bad.append(f"no {m.group(1)}")
        elif m.group(2) and m.group(2) not in _headings(doc):
            bad.append(f'{m.group(1)} has no section "{m.group(2)}"')
    return bad


def test_the_checker_finds_a_wrong_pointer():
    assert _broken('see README "Docker and Swarm"') == ['README has no section "Docker and Swarm"']
    assert _broken('docs/emulation.md, "Docker and Swarm"') == []
    assert _broken("docs/nothing.md") == ["no docs/nothing.md"]


@pytest.mark.parametrize("where,text", [t for t in _help_texts() if _README.search(t[1]) or _DOC.search(t[1])])
def test_help_pointers_name_sections_that_exist(where, text):
    assert _broken(text) == [], where
