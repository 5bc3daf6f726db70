"""Checkpoints and export of the single-process trainer: bf16 export, faults, a used output_dir, planted pickles."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lopt_dist.checkpoint import CheckpointError, RunCheckpoints
from lopt_dist.cli import train_main
from lopt_dist.config import load_config
from lopt_dist.run import train
from lopt_dist.telemetry.metrics import read_metrics
from tests.checkpoint.test_safe_load import plant_pickle
from tests.conftest import exported_weights
from tools.export import main as export_main


def _overrides(model_dir, out, *extra) -> list[str]:
    return [f"model.name={model_dir}", f"output_dir={out}", "train.steps=2", "train.micro_batch_size=2",
            "data.builtin_samples=8", "data.max_seq_length=160", "logging.progress=false", "checkpoint.save_every=1",
            "checkpoint.keep_last=3", "checkpoint.export_dtype=bfloat16", "checkpoint.export_shard_size=200KB", *extra]


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    model = tiny_model_dir("llama")
    return model, train(load_config(None, _overrides(model, tmp_path_factory.mktemp("local-run"))))


def _linked_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def test_bf16_export_from_fp32_weights_and_lopt_export_agree(run, tmp_path):
    _, result = run
    assert json.loads((result.model_dir / "config.json").read_text())["dtype"] == "bfloat16"
    exported = exported_weights(result.model_dir)
    assert len(set(json.loads((result.model_dir / "model.safetensors.index.json").read_text())
                   ["weight_map"].values())) >= 4
    # Each exported tensor is the checkpoint's fp32 weight rounded to bf16, under the model's name.
    for i in (0, 1):
        stage_dir = result.checkpoint / f"stage_{i}"
        fp32 = load_file(stage_dir / "model.safetensors")
        for entry in json.loads((stage_dir / "tensors.json").read_text())["tensors"]:
            assert fp32[entry["key"]].dtype == torch.float32
            assert torch.equal(exported[entry["name"]], fp32[entry["key"]].bfloat16()), entry["name"]
    assert export_main([str(result.checkpoint), str(tmp_path / "again")]) == 0
    again = exported_weights(tmp_path / "again")
    assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in exported)


def test_full_disk_while_saving_names_the_file_and_leaves_no_checkpoint(run, tmp_path, monkeypatch, capsys):
    # A real ENOSPC from the kernel: the stage's optimizer file is a link to /dev/full, the always-full device.
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    model_dir, _ = run
    staging = RunCheckpoints.staging

    def staging_on_a_full_disk(self, step):
        path = staging(self, step)
        (path / "stage_1").mkdir()
        (path / "stage_1" / "optimizer.pt").symlink_to("/dev/full")
        return path

    monkeypatch.setattr(RunCheckpoints, "staging", staging_on_a_full_disk)
    out = tmp_path / "full"
    assert train_main([a for o in _overrides(model_dir, out) for a in ("--set", o)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lopt-train")]  # not tqdm's
    assert len(err) == 1, err
    err = err[0]
    assert (f"cannot write {out}/checkpoints/.staging-step_000001/stage_1/optimizer.pt: No space left on device "
            "(ENOSPC); free space there") in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == []  # the staging directory is gone


def test_used_output_dir_is_refused_and_overwrite_starts_over(run, tmp_path, capsys):
    model_dir, result = run
    out = _linked_copy(result.output_dir, tmp_path / "used")
    args = [a for o in _overrides(model_dir, out, "train.steps=1") for a in ("--set", o)]
    assert train_main(args) == 2
    assert "already holds checkpoints of a run (newest: step_000002)" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000001", "step_000002"]
    assert train_main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000001"]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0]


def test_planted_pickle_does_not_run_on_local_resume(run, tmp_path):
    model_dir, result = run
    out = _linked_copy(result.output_dir, tmp_path / "planted")
    ckpt = out / "checkpoints" / "step_000002"
    marker = tmp_path / "pwned"
    target = ckpt / "stage_0" / "optimizer.pt"
    target.unlink()
    plant_pickle(target, marker)
    state = json.loads((ckpt / "state.json").read_text())  # an attacker can fix the recorded size too
    state["files"]["stage_0/optimizer.pt"] = target.stat().st_size
    (ckpt / "state.json").unlink()
    (ckpt / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"stage_0/optimizer\.pt cannot be read: it holds Python objects"):
        train(load_config(None, _overrides(model_dir, out, "checkpoint.resume=latest", "train.steps=3")))
    assert not marker.exists()


def test_latest_point_is_the_newest_checkpoint_checked_for_this_run(run, tmp_path):
    # What an automatic retry loop loads: the newest committed checkpoint, with every resume check applied.
    model_dir, result = run
    out = _linked_copy(result.output_dir, tmp_path / "retry")
    checkpoints = RunCheckpoints(load_config(None, _overrides(model_dir, out, "train.steps=4")), num_layers=4)
    point = checkpoints.latest_point()
    assert point.step == 2 and point.path == out / "checkpoints" / "step_000002"
    (point.path / "stage_1" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"step_000002/stage_1/model\.safetensors is missing"):
        checkpoints.latest_point()
