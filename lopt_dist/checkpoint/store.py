"""The checkpoints of one output directory: staged, committed by one rename, pointed to by `latest`, pruned.

Layout under `<output_dir>/checkpoints/`:
    step_000004/            a committed checkpoint: state.json (step, config, file sizes) and one dir per stage
    latest                  the name of the newest committed checkpoint
    .staging-step_000006/   being written; never read, removed at the next start
    .trash-step_000002-*/   being deleted; removed at the next start

A checkpoint is committed only after every file in it was fsynced and `state.json` (which lists each file's
size) was written: a crash before the rename leaves a staging directory, never a half-written `step_*`.
Directories are deleted by renaming them to a trash name first, so a kill during pruning cannot leave a
half-deleted `step_*` behind. Order is always by step number, never by name.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from lopt_dist.checkpoint.files import (
    CheckpointWriteError,
    fsync_dir,
    fsync_tree,
    os_errors_named,
    remove_tree,
    sweep_trash,
    write_text,
    write_text_atomic,
)

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
LATEST = "latest"
STAGING_PREFIX = ".staging-"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def step_of(path: Path) -> int | None:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Committed:
    step: int
    path: Path


class CheckpointStore:
    def __init__(self, root: str | Path, keep_last: int) -> None:
        self.root = Path(root)
        self.keep_last = keep_last

    # ---- what is there ----

    def committed(self) -> list[Committed]:
        """Committed checkpoints, oldest first by step number."""
        found = [Committed(step, p) for p in self.root.glob("step_*")
                 if (step := step_of(p)) is not None and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda c: c.step)

    def latest(self) -> Committed | None:
        """The newest committed checkpoint by step (the `latest` file names the same one, for people and tools)."""
        committed = self.committed()
        return committed[-1] if committed else None

    # ---- hygiene ----

    def clean(self) -> None:
        """Remove what an interrupted run left: staging and trash directories, half-deleted `step_*` directories
        (no state.json: a commit renames only complete ones, so such a directory can only be a deletion's remains)
        and a `latest` file that does not name the newest checkpoint. Call once at start, before staging."""
        if not self.root.is_dir():
            return
        sweep_trash(self.root)
        for stale in self.root.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        for path in self.root.glob("step_*"):
            if path.is_dir() and not (path / STATE_FILE).is_file():
                logger.warning("removing %s: an incomplete checkpoint directory (no %s)", path, STATE_FILE)
                remove_tree(path)
        self._point_latest()

    def discard_all(self) -> None:
        """Delete every checkpoint (a run started over with --overwrite)."""
        for c in self.committed():
            remove_tree(c.path)
        (self.root / LATEST).unlink(missing_ok=True)

    def rewind(self, step: int) -> list[int]:
        """Resuming at `step`: checkpoints after it belong to the abandoned continuation and are deleted (the
        resumed run writes them again), so that `latest` and pruning never mix two histories. Returns their steps."""
        dropped = [c for c in self.committed() if c.step > step]
        for c in dropped:
            remove_tree(c.path)
        if dropped:
            self._point_latest()
        return [c.step for c in dropped]

    # ---- writing ----

    def staging(self, step: int) -> Path:
        """A fresh directory for the state after `step` completed steps."""
        path = self.root / f"{STAGING_PREFIX}{step_dir_name(step)}"
        with os_errors_named(path):
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
        return path

    def commit(self, staging: Path, step: int, state: dict) -> Path:
        """Seal a staged checkpoint: state.json with every file's size, one rename, `latest`, then pruning.

        On an OS error (a full disk) the staging directory is deleted and the error names the file and cause.
        """
        try:
            files = {str(p.relative_to(staging)): p.stat().st_size for p in sorted(staging.rglob("*")) if p.is_file()}
            write_text(staging / STATE_FILE, json.dumps({**state, "step": step, "files": files}, indent=2))
            fsync_tree(staging, files=False)  # the writers synced their files; make the entries durable too
            final = self.root / step_dir_name(step)
            with os_errors_named(final):
                remove_tree(final)  # only after a rewind could the same step exist
                os.replace(staging, final)
                fsync_dir(self.root)
            write_text_atomic(self.root / LATEST, final.name)
        except CheckpointWriteError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.prune()
        return final

    def abort(self) -> None:
        """Delete every staging directory (after a failed step or save: what they hold is not a checkpoint)."""
        for staging in self.root.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(staging, ignore_errors=True)

    def prune(self) -> None:
        """Keep the newest `keep_last` checkpoints by step."""
        for c in self.committed()[: -self.keep_last]:
            remove_tree(c.path)

    def _point_latest(self) -> None:
        committed = self.committed()
        pointer = self.root / LATEST
        if not committed:
            pointer.unlink(missing_ok=True)
        elif not pointer.is_file() or pointer.read_text().strip() != committed[-1].path.name:
            write_text_atomic(pointer, committed[-1].path.name)
