"""The checkpoint store on a real file system: commit, `latest`, pruning by step, hygiene, faults."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil

import pytest

from lopt_dist.checkpoint.files import CheckpointWriteError
from lopt_dist.checkpoint.store import CheckpointStore
from lopt_dist.telemetry.metrics import MetricsLog, read_metrics


def _stage(store: CheckpointStore, step: int):
    staged = store.staging(step)
    (staged / "stage_0").mkdir()
    (staged / "stage_0" / "weights.bin").write_bytes(b"x" * step)
    return staged


def _commit(store: CheckpointStore, step: int) -> None:
    store.commit(_stage(store, step), step, {"format": 2})


def _names(store: CheckpointStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir())


def test_commit_records_file_sizes_and_points_latest(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    _commit(store, 3)
    state = json.loads((tmp_path / "step_000003" / "state.json").read_text())
    assert state["step"] == 3 and state["files"] == {"stage_0/weights.bin": 3}
    assert (tmp_path / "latest").read_text() == "step_000003"
    assert _names(store) == ["latest", "step_000003"]


def test_pruning_orders_by_step_number_not_by_name(tmp_path):
    # By name "step_1000000" sorts before "step_999999": a name sort would delete the newest checkpoint.
    store = CheckpointStore(tmp_path, keep_last=2)
    for step in (999_998, 999_999, 1_000_000):
        _commit(store, step)
    assert [c.step for c in store.committed()] == [999_999, 1_000_000]
    assert store.latest().step == 1_000_000
    assert (tmp_path / "latest").read_text() == "step_1000000"


def test_a_kill_during_pruning_leaves_only_a_trash_name_that_the_next_start_removes(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path, keep_last=1)
    _commit(store, 1)

    def killed(path, ignore_errors=False):  # the process dies in the middle of deleting the old checkpoint
        os.remove(next(p for p in path.rglob("*") if p.is_file()))
        raise KeyboardInterrupt

    staged = _stage(store, 2)
    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        store.commit(staged, 2, {"format": 2})
    monkeypatch.undo()
    names = _names(store)
    assert "step_000001" not in names and any(n.startswith(".trash-step_000001") for n in names)
    assert [c.step for c in store.committed()] == [2]
    store.clean()
    assert _names(store) == ["latest", "step_000002"]


def test_start_up_hygiene_removes_half_deleted_staging_and_stale_pointer(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3)
    _commit(store, 4)
    (tmp_path / "step_000030" / "stage_0").mkdir(parents=True)  # an old, half-deleted checkpoint: no state.json
    (tmp_path / ".staging-step_000005" / "stage_1").mkdir(parents=True)  # a save interrupted by a crash
    (tmp_path / "latest").write_text("step_000030")
    store.clean()
    assert _names(store) == ["latest", "step_000004"]
    assert (tmp_path / "latest").read_text() == "step_000004"


def test_half_written_checkpoint_never_becomes_latest(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3)
    _commit(store, 2)
    staged = store.staging(3)  # the workers wrote part of step 3, then the run died
    (staged / "stage_0").mkdir()
    assert store.latest().step == 2
    store.clean()
    assert _names(store) == ["latest", "step_000002"]


def test_rewind_drops_the_abandoned_continuation(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=5)
    for step in (1, 2, 3):
        _commit(store, step)
    assert store.rewind(1) == [2, 3]
    assert [c.step for c in store.committed()] == [1]
    assert (tmp_path / "latest").read_text() == "step_000001"


def test_full_disk_while_committing_names_the_file_and_removes_the_staging(tmp_path):
    # /dev/full is the kernel's always-full device: every write to it fails with ENOSPC, as on a full disk.
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    store = CheckpointStore(tmp_path / "checkpoints", keep_last=2)
    staged = store.staging(1)
    (staged / "state.json").symlink_to("/dev/full")
    with pytest.raises(CheckpointWriteError, match=r"cannot write .*state\.json: No space left on device \(ENOSPC\); "
                                                   r"free space there"):
        store.commit(staged, 1, {"format": 2})
    assert not staged.exists()
    assert store.committed() == [] and not (store.root / "latest").exists()


def test_metrics_of_a_resumed_run_drop_the_steps_it_redoes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in range(5):
        log.write({"step": step})
    log.close()
    with open(path, "a") as fh:
        fh.write('{"step": 5, "task_lo')  # a record torn by a kill
    resumed = MetricsLog(path, start_step=2)
    resumed.write({"step": 2})
    resumed.close()
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2]


def test_write_errors_survive_the_trip_from_a_worker():
    # Ray re-creates a worker's exception on the driver from its pickled args.
    err = CheckpointWriteError.of("/ckpt/x.pt", OSError(errno.ENOSPC, "No space left on device"))
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is CheckpointWriteError and str(again) == str(err)
    assert str(err).startswith("cannot write /ckpt/x.pt: No space left on device (ENOSPC); free space there")
