"""Write a directory so that readers see either the old one or the complete new one, never half of it."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success it replaces `target` in one rename.

    The directory gets the permissions the user's umask gives (mkdtemp's 0700 would hide a model from the
    user's group). A kill midway leaves a `.<name>.tmp-*` sibling, which `remove_stale` deletes.
    """
    from lopt_dist.checkpoint.files import fsync_dir, fsync_tree, os_errors_named

    target = Path(target)
    with os_errors_named(target.parent):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        with os_errors_named(target):
            if target.exists():
                # Move the old one aside first: rename cannot replace a non-empty directory.
                old = target.parent / f".{target.name}.tmp-old-{os.getpid()}-{secrets.token_hex(4)}"
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
            fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale(target: str | Path) -> None:
    """Delete what an interrupted `atomic_directory(target)` left behind."""
    target = Path(target)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
