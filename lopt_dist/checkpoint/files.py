"""File-system steps of checkpointing: durable writes, atomic replacement, removal that survives a kill.

Every write runs under `os_errors_named` (most through `open_for_write`), so an OS error (a full disk, a read-only
mount, a quota) becomes a `CheckpointWriteError` that names the file and the cause instead of a library's internal
message (torch.save given a path reports ENOSPC as "unexpected pos").
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from lopt_dist.config import ConfigError

TRASH_PREFIX = ".trash-"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used or written; the message names the file and the fix."""


class CheckpointWriteError(CheckpointError):
    """An OS error while writing a checkpoint or an export. Built from the message alone, so that it survives
    the trip from a Ray worker to the driver (Ray re-creates exceptions from their args)."""

    @classmethod
    def of(cls, path: str | Path, err: OSError) -> CheckpointWriteError:
        cause = os.strerror(err.errno) if err.errno else str(err)
        code = errno.errorcode.get(err.errno, "") if err.errno else ""
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = "free space there (or point output_dir at a bigger disk) and resume with --resume"
        elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            fix = "make it writable for this user (or choose another output_dir)"
        else:
            fix = "fix the file system problem and resume with --resume"
        return cls(f"cannot write {path}: {cause}{f' ({code})' if code else ''}; {fix}")


@contextlib.contextmanager
def os_errors_named(path: str | Path) -> Iterator[None]:
    """Turn an OSError raised inside into a CheckpointWriteError about `path`."""
    try:
        yield
    except CheckpointWriteError:
        raise
    except OSError as err:
        raise CheckpointWriteError.of(getattr(err, "filename", None) or path, err) from err


@contextlib.contextmanager
def open_for_write(path: str | Path) -> Iterator[BinaryIO]:
    """A new file, flushed and fsynced before the block ends; writers get a Python file object so that OS errors
    arrive as OSError with their errno (torch.save given a path reports ENOSPC as 'unexpected pos')."""
    with os_errors_named(path):
        with open(path, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


def write_text(path: str | Path, text: str) -> None:
    with open_for_write(path) as fh:
        fh.write(text.encode())


def write_text_atomic(path: Path, text: str) -> None:
    """Readers see the old content or the new one, never a prefix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_text(tmp, text)
        with os_errors_named(path):
            os.replace(tmp, path)
            fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path, files: bool = True) -> None:
    """fsync every directory under `root` (their entries) and, with `files`, every file."""
    with os_errors_named(root):
        if files:
            for path in sorted(root.rglob("*")):
                if path.is_file() and not path.is_symlink():
                    with open(path, "rb") as fh:
                        os.fsync(fh.fileno())
        for directory in [root, *(p for p in root.rglob("*") if p.is_dir())]:
            fsync_dir(directory)


def remove_tree(path: Path) -> None:
    """Delete a directory so that a kill midway leaves only a `.trash-*` name, never a half-deleted original.

    The rename is atomic; what is left of an interrupted delete is swept by `sweep_trash` at the next start.
    """
    if not path.exists():
        return
    trash = path.parent / f"{TRASH_PREFIX}{path.name}-{secrets.token_hex(4)}"
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def sweep_trash(root: Path) -> None:
    for trash in root.glob(f"{TRASH_PREFIX}*"):
        shutil.rmtree(trash, ignore_errors=True)
