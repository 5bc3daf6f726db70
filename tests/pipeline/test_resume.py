"""Stopping after 3 steps and resuming from step 2 equals one run of 4 steps: same losses, same weights, each step
recorded once."""

from __future__ import annotations

import json

import pytest
import ray
import torch

from lopt_dist.config import ConfigError, load_config
from lopt_dist.run import train
from tests.conftest import REPO, exported_weights
from tools.export import main as export_main


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(address="local", num_cpus=4, include_dashboard=False)  # never a cluster someone else runs here
    yield
    ray.shutdown()


def _config(model_dir, out, *extra):
    zero2 = str(REPO / "configs/deepspeed/zero2.json")
    return load_config(None, [
        f"model.name={model_dir}", f"output_dir={out}", "runtime.mode=ray", "train.steps=4",
        "train.micro_batch_size=2", "train.micro_batches_per_step=2", "train.lr=2e-3", "train.warmup_steps=1",
        "data.builtin_samples=8", "data.max_seq_length=160", "logging.progress=false",
        f"runtime.groups=[{{deepspeed_config: {zero2}}}, {{deepspeed_config: {zero2}}}]", *extra,
    ])


def test_stop_and_resume_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    model = tiny_model_dir("llama")
    straight = train(_config(model, tmp_path / "straight"))

    out = tmp_path / "interrupted"
    first = train(_config(model, out, "checkpoint.stop_after=3", "checkpoint.save_every=1"))
    assert [r["step"] for r in first.records] == [0, 1, 2]
    assert first.model_dir is None  # training is not finished, so nothing is exported yet
    state = json.loads((out / "checkpoints" / "step_000002" / "state.json").read_text())
    assert state["step"] == 2 and state["micro_batches_consumed"] == 4

    # Resume from the older of the two checkpoints kept: step 2 is trained again, and recorded once.
    second = train(_config(model, out, f"checkpoint.resume={out}/checkpoints/step_000002"))
    assert [r["step"] for r in second.records] == [2, 3]
    for want, got in zip(straight.records[2:], second.records):
        assert got["task_loss"] == pytest.approx(want["task_loss"], rel=1e-6)
        assert got["recon_loss_0"] == pytest.approx(want["recon_loss_0"], rel=1e-6)
    want, got = exported_weights(straight.model_dir), exported_weights(second.model_dir)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=name)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 3]  # no step twice
    # step_000003 belonged to the abandoned continuation: deleted at the resume, not mixed with the new one.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000002", "step_000004"]

    # lopt-export rebuilds the same model from the DeepSpeed checkpoint alone.
    assert export_main([str(out / "checkpoints" / "step_000004"), str(tmp_path / "exported")]) == 0
    exported = exported_weights(tmp_path / "exported")
    for name in want:
        torch.testing.assert_close(exported[name], got[name], rtol=0, atol=0, msg=name)


def test_resume_refuses_a_config_that_changes_the_batches(tiny_model_dir, tmp_path):
    model = tiny_model_dir("llama")
    train(_config(model, tmp_path, "checkpoint.stop_after=1"))
    with pytest.raises(ConfigError, match=r"data\.seed: is 5 but the checkpoint .* was made with 0"):
        train(_config(model, tmp_path, "checkpoint.resume=latest", "data.seed=5"))
