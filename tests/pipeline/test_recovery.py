"""A Ray run recovers by itself from killed and stopped workers, and stops cleanly at a checkpoint on SIGTERM.

One uninterrupted reference run is compared with runs that suffer faults: each must end with the same per-step
losses and the same weights, bit for bit, every step recorded once, and each failure blamed on the worker that
had it. The workers inject the faults themselves at a chosen step (lopt_dist/pipeline/faults.py): real SIGKILL
and SIGSTOP of their own process.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import ray
import torch

from lopt_dist.config import load_config
from lopt_dist.pipeline.faults import ENV as FAULTS_ENV
from lopt_dist.recovery.journal import read_failures
from lopt_dist.run import train
from lopt_dist.telemetry.metrics import read_metrics
from tests.conftest import REPO, exported_weights

STEPS = 8
STEP_FLOOR_S, HEALTH_S = 4.0, 3.0  # the test configs' hang bound (floor) and status-probe timeout


@pytest.fixture(scope="module")
def faults_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "faults.json"
    path.write_text("[]")
    return path


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(faults_file):
    os.environ[FAULTS_ENV] = str(faults_file)  # before Ray starts: its workers inherit the environment
    ray.init(address="local", num_cpus=4, include_dashboard=False)  # never a cluster someone else runs here
    yield
    ray.shutdown()
    del os.environ[FAULTS_ENV]


def _overrides(model_dir, out, *extra) -> list[str]:
    zero0 = str(REPO / "configs/deepspeed/zero0.json")
    return [f"model.name={model_dir}", f"output_dir={out}", "runtime.mode=ray", f"train.steps={STEPS}",
            "train.micro_batch_size=2", "train.micro_batches_per_step=2", "train.lr=2e-3", "train.warmup_steps=1",
            "data.builtin_samples=32", "data.max_seq_length=64", "logging.progress=false",
            "checkpoint.save_every=2", f"runtime.groups=[{{deepspeed_config: {zero0}}}, {{deepspeed_config: {zero0}}}]",
            f"runtime.step_timeout_min_s={STEP_FLOOR_S}", "runtime.step_timeout_factor=3",
            "runtime.first_step_timeout_s=120", f"runtime.health_timeout_s={HEALTH_S}", "runtime.save_timeout_s=60",
            *extra]


def _inject(faults_file: Path, tmp_path: Path, *faults: dict) -> list[Path]:
    """Arm `faults` for the next run; returns the files each creates when it fires."""
    fired = [tmp_path / f"fired-{i}" for i in range(len(faults))]
    faults_file.write_text(json.dumps([{**f, "once": str(p)} for f, p in zip(faults, fired)]))
    return fired


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory, faults_file):
    faults_file.write_text("[]")
    result = train(load_config(None, _overrides(tiny_model_dir("llama"), tmp_path_factory.mktemp("reference"))))
    return read_metrics(result.output_dir / "metrics.jsonl"), exported_weights(result.model_dir)


def _assert_same_run(reference, out: Path) -> None:
    """The run in `out` recorded each step once, with the reference's losses, and exported its weights."""
    want_records, want_weights = reference
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(STEPS))
    for want, got in zip(want_records, records):
        for key in ("task_loss", "recon_loss_0"):
            assert got[key] == want[key], (want["step"], key, got[key], want[key])
    weights = exported_weights(out / "model")
    assert weights.keys() == want_weights.keys()
    for name, tensor in want_weights.items():
        assert torch.equal(weights[name], tensor), name


def _seconds(iso: str) -> float:
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S%z").timestamp()


def test_killed_stage0_and_stopped_stage1_are_recovered_by_restarting_every_stage(
        tiny_model_dir, reference, faults_file, tmp_path):
    kill_step = random.randint(1, 3)  # mid-run, after a checkpoint or not
    killed, stopped = _inject(
        faults_file, tmp_path,
        {"stage": 0, "rank": 0, "at": "train_step", "step": kill_step, "action": "SIGKILL"},
        {"stage": 1, "rank": 0, "at": "train_step", "step": 5, "action": "SIGSTOP"})
    out = tmp_path / "run"
    result = train(load_config(None, _overrides(tiny_model_dir("llama"), out, "runtime.restart_stage_only=false")))

    assert killed.exists() and stopped.exists()
    _assert_same_run(reference, out)
    assert [r["step"] for r in result.records] == list(range(STEPS))
    first, second = read_failures(out)
    assert (first["worker"], first["kind"], first["phase"], first["step"]) == (
        "stage 0 worker 0", "died", "train_step", kill_step), (kill_step, first)
    newest = kill_step // 2 * 2  # checkpoints every 2 steps
    where = f"step_{newest:06d}" if newest else "step 0 (no checkpoint yet)"
    assert first["action"].startswith(f"restart every stage from {where}")
    assert "stage 1 worker 0" in first["others"]
    assert (second["worker"], second["kind"], second["step"]) == ("stage 1 worker 0", "unresponsive", 5), second
    assert second["pid"] and second["action"].startswith("restart every stage from step_000004")
    # The stopped worker is found within the hang bound (the floor: steps take well under a second here) plus
    # the status probe's timeout; a second for the journal's whole-second clock and a loaded machine's lag.
    assert _seconds(second["time"]) - stopped.stat().st_mtime <= STEP_FLOOR_S + HEALTH_S + 2.0, second


def _stage_worker_ids() -> set[str]:
    """Every StageWorker actor this Ray instance has started, alive or dead. Read from the GCS actor table
    (Ray's state API needs the dashboard, which this module does not start)."""
    from ray._private.state import actors

    return {a["ActorID"] for a in actors().values() if a["ActorClassName"] == "StageWorker"}


def test_killed_stage1_worker_restarts_stage1_alone_and_stage0_keeps_its_state(
        tiny_model_dir, reference, faults_file, tmp_path):
    # Stage 1 of two workers (the same updates as one: ZeRO-0, gradients averaged over the micro-batches).
    killed, = _inject(faults_file, tmp_path,
                      {"stage": 1, "rank": 1, "at": "train_step", "step": 5, "action": "SIGKILL"})
    before = _stage_worker_ids()
    out = tmp_path / "run"
    zero0 = str(REPO / "configs/deepspeed/zero0.json")
    groups = f"runtime.groups=[{{deepspeed_config: {zero0}}}, {{deepspeed_config: {zero0}, workers: 2}}]"
    result = train(load_config(None, _overrides(tiny_model_dir("llama"), out, groups)))

    assert killed.exists()
    _assert_same_run(reference, out)
    assert [r["step"] for r in result.records] == list(range(STEPS))
    # Three workers at the start, two more for the restarted stage 1: stage 0's worker lived through the run (a
    # restart of every stage would have started three more), so its state never went back to the checkpoint.
    assert len(_stage_worker_ids() - before) == 5
    failure, = read_failures(out)  # and the surviving stage kept going on the new boundary group
    assert (failure["worker"], failure["kind"], failure["phase"], failure["step"]) == (
        "stage 1 worker 1", "died", "train_step", 5), failure
    assert failure["action"].startswith("restart stage 1 alone from step_000004; the other stages keep their state")


def test_replay_log_too_small_falls_back_to_restarting_every_stage(tiny_model_dir, reference, faults_file, tmp_path):
    killed, = _inject(faults_file, tmp_path,
                      {"stage": 1, "rank": 0, "at": "train_step", "step": 5, "action": "SIGKILL"})
    before = _stage_worker_ids()
    out = tmp_path / "run"
    train(load_config(None, _overrides(tiny_model_dir("llama"), out, "runtime.replay_buffer_size=1")))

    assert killed.exists()
    _assert_same_run(reference, out)
    assert len(_stage_worker_ids() - before) == 4  # both stages started again
    failure, = read_failures(out)
    assert failure["worker"] == "stage 1 worker 0" and failure["step"] == 5, failure
    assert failure["action"].startswith("restart every stage from step_000004"), failure
    assert "not restarted alone: stage 0 worker 0 keeps activations only from micro-batch" in failure["action"]


def test_worker_killed_while_saving_a_checkpoint_is_recovered_exactly(
        tiny_model_dir, reference, faults_file, tmp_path):
    killed, = _inject(faults_file, tmp_path,
                      {"stage": 0, "rank": 0, "at": "save_checkpoint", "step": 4, "action": "SIGKILL"})
    out = tmp_path / "run"
    train(load_config(None, _overrides(tiny_model_dir("llama"), out)))

    assert killed.exists()
    _assert_same_run(reference, out)
    failure, = read_failures(out)
    assert (failure["worker"], failure["kind"], failure["phase"], failure["step"]) == (
        "stage 0 worker 0", "died", "save_checkpoint", 4), failure
    # The checkpoint it was writing was never committed: stage 0 starts again from the one before.
    assert failure["action"].startswith("restart stage 0 alone from step_000002"), failure


def test_sigterm_stops_the_cli_at_a_checkpoint_and_resume_continues_exactly(
        tiny_model_dir, reference, faults_file, tmp_path):
    faults_file.write_text("[]")
    out = tmp_path / "run"
    overrides = _overrides(tiny_model_dir("llama"), out, "checkpoint.save_every=5", "runtime.ray_num_cpus=4")
    args = [a for o in overrides for a in ("--set", o)]
    env = {k: v for k, v in os.environ.items() if k != FAULTS_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    with open(tmp_path / "cli.log", "w") as log:
        cli = subprocess.Popen([sys.executable, "-m", "lopt_dist.cli", *args], env=env, cwd=REPO, stdout=log,
                               stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and not _steps_recorded(out) >= 2:
                assert cli.poll() is None, (tmp_path / "cli.log").read_text()[-3000:]
                time.sleep(0.2)
            cli.send_signal(signal.SIGTERM)  # the driver only, as a scheduler signals its main process
            code = cli.wait(timeout=120)
        finally:
            if cli.poll() is None:
                cli.kill()
    text = (tmp_path / "cli.log").read_text()
    assert code == 75, text[-3000:]
    done = _steps_recorded(out)
    assert 2 <= done < STEPS
    checkpoint = out / "checkpoints" / f"step_{done:06d}"
    last = [line for line in text.splitlines() if line.startswith("lopt-train:")][-1]  # Ray's log lines interleave
    assert last.startswith(f"lopt-train: stopped by SIGTERM after step {done}; saved the state in {checkpoint}; "
                           "continue with: lopt-train --set"), last
    assert last.endswith(" --resume") and "Traceback" not in text, text[-3000:]
    assert (checkpoint / "state.json").is_file()

    resumed = train(load_config(None, [*overrides, "checkpoint.resume=latest"]))
    assert [r["step"] for r in resumed.records] == list(range(done, STEPS))
    _assert_same_run(reference, out)


def _steps_recorded(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0
