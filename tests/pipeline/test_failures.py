"""With `runtime.max_failures: 0` (fail fast) a worker that dies mid-run stops the whole run within seconds, names
itself, and leaves nothing behind. (Recovery from such failures: test_recovery.py.)"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray
from ray.util.state import list_actors

from lopt_dist.config import load_config
from lopt_dist.recovery import RunFailedError
from lopt_dist.run import train
from tests.conftest import REPO

PROMPT_S = 20.0  # from the kill to the driver's error, on a busy 2-core machine


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=True)  # the state API (list_actors) needs the dashboard
    yield
    ray.shutdown()


def _stage_workers(state: str) -> list:
    address = ray.get_runtime_context().gcs_address
    return list_actors(address=address, filters=[("class_name", "=", "StageWorker"), ("state", "=", state)],
                       detail=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_killed_worker_fails_a_fail_fast_run_promptly_and_by_name(tiny_model_dir, tmp_path):
    zero2 = str(REPO / "configs/deepspeed/zero2.json")
    cfg = load_config(None, [
        f"model.name={tiny_model_dir('llama')}", f"output_dir={tmp_path}", "runtime.mode=ray",
        "train.steps=500", "train.micro_batch_size=2", "data.builtin_samples=32", "data.max_seq_length=64",
        "logging.progress=false", f"runtime.groups=[{{deepspeed_config: {zero2}}}, {{deepspeed_config: {zero2}}}]",
        "runtime.max_failures=0",
    ])
    outcome: dict = {}

    def run() -> None:
        try:
            train(cfg)
        except BaseException as err:  # handed to the test thread
            outcome["error"] = err
        outcome["at"] = time.monotonic()

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert runner.is_alive(), outcome
        time.sleep(0.5)
    workers = _stage_workers("ALIVE")
    assert sorted(w.repr_name for w in workers) == ["StageWorker(stage=0)", "StageWorker(stage=1)"]
    victim = next(w for w in workers if w.repr_name == "StageWorker(stage=1)")
    pids = [w.pid for w in workers]

    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    runner.join(timeout=120)

    assert not runner.is_alive(), "the driver hung after a worker died"
    error = outcome.get("error")
    assert isinstance(error, RunFailedError), repr(error)
    assert outcome["at"] - killed_at < PROMPT_S
    assert error.failure.worker == "stage 1 worker 0" and error.failure.kind == "died"
    assert error.failure.pid == victim.pid
    assert "in step" in str(error) and "runtime.max_failures is 0" in str(error)
    assert "No checkpoint was committed" in str(error)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (_stage_workers("ALIVE") or any(_alive(p) for p in pids)):
        time.sleep(0.5)
    assert _stage_workers("ALIVE") == []
    assert not any(_alive(p) for p in pids), "worker processes outlived the run"


def test_groups_larger_than_the_cluster_fail_fast_with_what_was_asked(tiny_model_dir, tmp_path):
    from lopt_dist.pipeline.errors import WorkerGroupStartError

    zero2 = str(REPO / "configs/deepspeed/zero2.json")
    cfg = load_config(None, [
        f"model.name={tiny_model_dir('llama')}", f"output_dir={tmp_path}", "runtime.mode=ray",
        "train.micro_batches_per_step=3", "logging.progress=false",
        f"runtime.groups=[{{workers: 3, deepspeed_config: {zero2}}}, {{workers: 3, deepspeed_config: {zero2}}}]",
    ])
    started = time.monotonic()
    with pytest.raises(WorkerGroupStartError, match=r"need 6 CPUs .*stage 0: 3 workers x 1 CPU.* has only 4 CPU"):
        train(cfg)
    assert time.monotonic() - started < 10
    assert _stage_workers("ALIVE") == []
