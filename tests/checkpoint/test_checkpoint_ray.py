"""Checkpoints and export of the Ray pipeline, on one run: stage 0 a ZeRO-3 group of 2 workers, stage 1 ZeRO-0.

- the export the workers write (several shards) loads with AutoModelForCausalLM and gives the logits of the
  trained stages, as DeepSpeed's own readers rebuild them from the checkpoint;
- lopt-export of the checkpoint writes the same tensors, and never overwrites a non-empty directory unasked;
- every unusable checkpoint is refused before a worker starts, in one line naming the file and the fix;
- a planted pickle in a checkpoint does not run on --resume.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from lopt_dist.cli import train_main
from lopt_dist.config import load_config
from lopt_dist.model import run_stages, split_model
from lopt_dist.model.loading import load_causal_lm
from lopt_dist.pipeline.driver import PipelineDriver
from lopt_dist.pipeline.errors import WorkerFailedError
from lopt_dist.run import train
from tests.checkpoint.test_safe_load import plant_pickle
from tests.conftest import REPO, exported_weights
from tools.export import main as export_main

STEPS = 1


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(address="local", num_cpus=4, include_dashboard=False)  # never a cluster someone else runs here
    yield
    ray.shutdown()


def _overrides(model_dir, out, *extra, zero=(3, 0)) -> list[str]:
    groups = [{"workers": 2, "deepspeed_config": str(REPO / f"configs/deepspeed/zero{zero[0]}.json")},
              {"workers": 1, "deepspeed_config": str(REPO / f"configs/deepspeed/zero{zero[1]}.json")}]
    return [f"model.name={model_dir}", f"output_dir={out}", "runtime.mode=ray", f"train.steps={STEPS}",
            "train.micro_batch_size=2", "train.micro_batches_per_step=2", "train.lr=2e-3", "data.builtin_samples=8",
            "data.max_seq_length=160", "logging.progress=false", "checkpoint.export_shard_size=200KB",
            f"runtime.groups={groups}", *extra]


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    model = tiny_model_dir("llama")
    out = tmp_path_factory.mktemp("ray-run")
    return model, train(load_config(None, _overrides(model, out)))


def _linked_copy(src: Path, dst: Path) -> Path:
    """A copy of a run directory whose files are hard links (files are replaced, never edited, by the code)."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def _replace(path: Path, data: bytes) -> None:
    path.unlink()  # break the hard link before writing
    path.write_bytes(data)


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids}


def test_workers_export_a_sharded_model_that_gives_the_trained_logits(run):
    model_dir, result = run
    index = json.loads((result.model_dir / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 4 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in exported_weights(result.model_dir).values())
    # The trained stages, rebuilt from the final checkpoint by DeepSpeed's own readers (trusted files).
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint = result.checkpoint
    stages = split_model(load_causal_lm(str(model_dir)), None, 10.0, 0)
    stages[0].load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint / "stage_0"), tag="state"))
    stages[1].load_state_dict(torch.load(checkpoint / "stage_1/state/mp_rank_00_model_states.pt",
                                         weights_only=False)["module"])
    batch = _batch()
    exported = AutoModelForCausalLM.from_pretrained(result.model_dir).eval()
    assert exported.config.tie_word_embeddings is False
    with torch.no_grad():
        want = run_stages(stages, batch)
        got = exported(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    umask = os.umask(0o022)
    os.umask(umask)  # (reading the umask means setting it)
    if not umask & 0o040:  # the user's umask lets the group read: so must the export
        for path in [result.model_dir, *result.model_dir.iterdir()]:
            assert path.stat().st_mode & stat.S_IRGRP, f"{path} is not readable by the group"


def test_lopt_export_writes_the_runs_own_model_and_never_overwrites_unasked(run, tmp_path, capsys):
    _, result = run
    target = tmp_path / "exported"
    assert export_main([str(result.checkpoint), str(target)]) == 0
    want, got = exported_weights(result.model_dir), exported_weights(target)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert export_main([str(result.checkpoint), str(tmp_path / "mine")]) == 2
    assert "is not empty" in capsys.readouterr().err and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert export_main([str(result.checkpoint), str(tmp_path / "mine"), "--overwrite"]) == 0
    assert not (tmp_path / "mine" / "notes.txt").exists()


def _damage_state(ckpt: Path) -> str:
    text = (ckpt / "state.json").read_text()
    _replace(ckpt / "state.json", text[: len(text) // 2].encode())
    return r"step_000001/state\.json is truncated or damaged .*; no other checkpoint is there, so start the run again"


def _truncate_stage_file(ckpt: Path) -> str:
    file = ckpt / "stage_1/state/mp_rank_00_model_states.pt"
    _replace(file, file.read_bytes()[:1000])
    return (r"step_000001/stage_1/state/mp_rank_00_model_states\.pt is truncated or changed \(1000 bytes, "
            r"committed with \d+\); no other checkpoint is there, so start the run again \(--overwrite\)")


def _delete_stage_0(ckpt: Path) -> str:
    shutil.rmtree(ckpt / "stage_0")
    return r"step_000001/stage_0/ is missing; the checkpoint is incomplete: no other checkpoint is there"


@pytest.mark.parametrize("damage", [_damage_state, _truncate_stage_file, _delete_stage_0])
def test_unusable_checkpoint_is_refused_in_one_line_before_workers_start(run, tmp_path, capsys, monkeypatch, damage):
    model_dir, result = run
    out = _linked_copy(result.output_dir, tmp_path / "damaged")
    expected = damage(out / "checkpoints" / "step_000001")
    monkeypatch.setattr(PipelineDriver, "start", _no_workers)
    args = [a for o in _overrides(model_dir, out) for a in ("--set", o)]
    assert train_main([*args, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lopt-train: error: ")
    assert re.search(expected, err), err


def _no_workers(*args, **kwargs):
    raise AssertionError("workers were started")


class _Started(Exception):
    pass


def _start_reached(*args, **kwargs):
    raise _Started


def test_resume_checks_the_zero_stage_and_the_boundaries_as_resolved(run, monkeypatch, capsys):
    model_dir, result = run
    out = result.output_dir
    monkeypatch.setattr(PipelineDriver, "start", _no_workers)
    args = [a for o in _overrides(model_dir, out, zero=(2, 0)) for a in ("--set", o)]
    assert train_main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert ("runtime.groups[0].deepspeed_config: ZeRO stage 2 but the checkpoint" in err
            and "written with ZeRO stage 3" in err and "zero3.json" in err), err
    # [2] is the default cut of this 4-layer model: the same stages, so the resume goes ahead (to starting workers).
    monkeypatch.setattr(PipelineDriver, "start", _start_reached)
    with pytest.raises(_Started):
        train(load_config(None, _overrides(model_dir, out, "model.boundaries=[2]", "checkpoint.resume=latest",
                                           f"train.steps={STEPS + 1}")))


def test_a_used_output_dir_is_refused_without_resume_or_overwrite(run, monkeypatch, capsys):
    model_dir, result = run
    monkeypatch.setattr(PipelineDriver, "start", _no_workers)
    args = [a for o in _overrides(model_dir, result.output_dir) for a in ("--set", o)]
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints of a run (newest: step_000001); continue it with --resume" in err
    assert "--overwrite" in err


def test_planted_pickle_does_not_run_on_resume(run, tmp_path):
    model_dir, result = run
    out = _linked_copy(result.output_dir, tmp_path / "planted")
    ckpt = out / "checkpoints" / "step_000001"
    marker = tmp_path / "pwned"
    target = ckpt / "stage_1/state/mp_rank_00_model_states.pt"
    target.unlink()
    plant_pickle(target, marker)
    state = json.loads((ckpt / "state.json").read_text())  # an attacker can fix the recorded size too
    state["files"]["stage_1/state/mp_rank_00_model_states.pt"] = target.stat().st_size
    _replace(ckpt / "state.json", json.dumps(state).encode())
    with pytest.raises(WorkerFailedError, match=r"stage 1 worker 0 raised: CheckpointError: .*mp_rank_00_model_states"
                                                r"\.pt cannot be read: it holds Python objects other than tensors"):
        train(load_config(None, _overrides(model_dir, out, "checkpoint.resume=latest", f"train.steps={STEPS + 1}")))
    assert not marker.exists()
    assert export_main([str(ckpt), str(tmp_path / "exported")]) == 2
    assert not marker.exists()
