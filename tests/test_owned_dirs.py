"""Owned directories (testbed/emulation/owned_dirs.py): the testbed removes a directory only
when it resolves inside the directory the command owns and holds the testbed's marker —
never a path that escapes, the owner itself, a symlink, or a directory a user made."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from testbed.emulation.owned_dirs import MARKER, is_owned, make_owned_dir, mark_owned, remove_owned_dir
from testbed.errors import InputError, ResourceError


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """owner/ (the command's directory) and, beside it, victim/ with a file that must survive."""
    owner = tmp_path / "owner"
    owner.mkdir()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    mark_owned(victim)  # even a marked directory outside the owner is never removed
    return {"owner": owner, "victim": victim}


def test_a_marked_directory_inside_the_owner_is_removed(tree):
    d = make_owned_dir(tree["owner"] / "state")
    (d / "sub").mkdir()
    (d / "sub" / "f").write_text("x")
    assert is_owned(d) and (d / MARKER).stat().st_mode & 0o777 == 0o600
    assert remove_owned_dir(d, tree["owner"]) is True
    assert not d.exists() and tree["owner"].is_dir()
    assert remove_owned_dir(d, tree["owner"]) is False  # gone: nothing to do


@pytest.mark.parametrize("name", ["../victim", "..", ".", "", "sub/../../victim"])
def test_paths_that_escape_the_owner_are_refused(tree, name):
    with pytest.raises(InputError, match="not inside"):
        remove_owned_dir(tree["owner"] / name, tree["owner"])
    assert (tree["victim"] / "keep.txt").read_text() == "precious" and tree["owner"].is_dir()


def test_an_absolute_path_elsewhere_is_refused(tree):
    with pytest.raises(InputError, match="not inside"):
        remove_owned_dir(tree["victim"], tree["owner"])
    assert (tree["victim"] / "keep.txt").exists()


def test_a_directory_without_the_marker_is_left_alone(tree):
    mine = tree["owner"] / "users-own"
    mine.mkdir()
    (mine / "notes").write_text("mine")
    with pytest.raises(ResourceError, match="not made by the testbed"):
        remove_owned_dir(mine, tree["owner"])
    assert (mine / "notes").read_text() == "mine"


def test_a_symlink_to_a_marked_directory_is_not_followed(tree):
    link = tree["owner"] / "state"
    link.symlink_to(tree["victim"])
    with pytest.raises(ResourceError, match="symlink"):
        remove_owned_dir(link, tree["owner"])
    assert (tree["victim"] / "keep.txt").exists() and link.is_symlink()


def test_a_marker_that_is_a_symlink_does_not_count(tree):
    d = tree["owner"] / "state"
    d.mkdir()
    os.symlink(tree["victim"] / MARKER, d / MARKER)
    assert not is_owned(d)
    with pytest.raises(ResourceError):
        remove_owned_dir(d, tree["owner"])
    assert d.is_dir()


def test_make_owned_dir_never_adopts_an_existing_directory(tree):
    (tree["owner"] / "exists").mkdir()
    with pytest.raises(FileExistsError):
        make_owned_dir(tree["owner"] / "exists")
    assert not is_owned(tree["owner"] / "exists")
