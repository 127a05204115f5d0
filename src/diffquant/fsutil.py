"""File-system steps every long job needs: an output folder checked before the work starts, and a
checkpoint directory replaced so that a kill at any moment leaves a complete checkpoint.

A directory cannot be swapped atomically on POSIX: replacing ``target`` by ``fresh`` takes two
renames (``target`` → ``target.old``, ``fresh`` → ``target``). A kill between them leaves no
``target``; :func:`recover_directory` puts back whichever complete copy survived (the new one
when its completion marker was written, else the old one), and every reader calls it first.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import DiffquantError

OLD_SUFFIX = ".old"
NEW_SUFFIX = ".new"


def sibling(target: Path, suffix: str) -> Path:
    return target.with_name(target.name + suffix)


def recover_directory(target: str | os.PathLike, marker: str) -> None:
    """After an interrupted :func:`replace_directory`, restore ``target`` from a complete sibling.

    ``marker`` is the file written last into a fresh copy; its presence means the copy is whole."""
    target = Path(target)
    if target.exists():
        return
    for candidate in (sibling(target, NEW_SUFFIX), sibling(target, OLD_SUFFIX)):
        if (candidate / marker).is_file():
            candidate.rename(target)
            return


def replace_directory(fresh: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the complete directory ``fresh`` to ``target``, replacing what is there."""
    fresh, target = Path(fresh), Path(target)
    old = sibling(target, OLD_SUFFIX)
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    fresh.rename(target)
    if old.exists():
        shutil.rmtree(old)


def fresh_directory(target: str | os.PathLike, marker: str) -> Path:
    """An empty ``target.new`` to write a checkpoint into (after recovering an interrupted swap)."""
    target = Path(target)
    recover_directory(target, marker)
    fresh = sibling(target, NEW_SUFFIX)
    if fresh.exists():
        shutil.rmtree(fresh)
    fresh.mkdir(parents=True)
    return fresh


def check_writable_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Create ``path`` if needed and prove a file can be written in it, before any work is done.

    Refuses a path under a regular file, a read-only or pseudo file system, with one line."""
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise DiffquantError(f"{what} {path} cannot be created: {parent} is a file, not a folder")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".diffquant-write-test-"):
            pass
    except OSError as exc:
        raise DiffquantError(f"{what} {path} is not writable ({exc.strerror or exc})") from None
    return path
