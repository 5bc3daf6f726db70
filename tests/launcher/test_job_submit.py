"""A real Ray head on loopback, a real `ray job submit` of a tiny run, an exported model that loads.

The head is started by this test under its own session (`setsid`-style) with its own ports, temp dir and
auth token, and stopped by signalling that process group only; nothing else on the machine is touched.
"""

from __future__ import annotations

import os
import json
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from tests.conftest import REPO

RAY = str(Path(sys.executable).with_name("ray"))


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def ray_head(tmp_path):
    gcs, dashboard, client, node_mgr, obj_mgr, agent, agent_grpc, env_agent, metrics = _free_ports(9)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    # As on a cluster whose nodes run lopt-dist's environment: the job's `python` is this interpreter (an
    # activated virtualenv does the same), not whatever python comes first on the caller's PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("RAY_ADDRESS", None)
    temp_dir = Path("/tmp") / f"lopt-ray-{secrets.token_hex(4)}"  # Ray's socket paths must stay short
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
           f"--ray-client-server-port={client}", f"--node-manager-port={node_mgr}",
           f"--object-manager-port={obj_mgr}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
           f"--metrics-export-port={metrics}", "--num-cpus=4", f"--temp-dir={temp_dir}"]
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_dashboard(address, head, tmp_path / "head.log")
        yield address, env, temp_dir
    finally:
        _stop_group(head)
        log.close()
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


def _wait_for_dashboard(address: str, head: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # an answer, even "401: token required", means the dashboard is up
            return
        except OSError:
            time.sleep(1)
    pytest.fail(f"the Ray dashboard did not come up in {timeout_s} s:\n{log.read_text()[-3000:]}")


def _stop_group(head: subprocess.Popen) -> None:
    """SIGTERM the head's own process group, SIGKILL what remains after 2 s (some of Ray's processes outlive a
    SIGTERM for good: waiting longer only costs time)."""
    pgid = os.getpgid(head.pid)
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.5)
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _job_status(address: str, env: dict, job_id: str) -> str:
    done = subprocess.run([RAY, "job", "status", "--address", address, job_id], env=env, capture_output=True,
                          text=True, timeout=60)
    text = done.stdout + done.stderr
    # `ray job status` words the terminal states ("Job 'x' succeeded") and prints the others as they are.
    for word, state in (("succeeded", "SUCCEEDED"), ("failed", "FAILED"), ("was stopped", "STOPPED")):
        if f"' {word}" in text:
            return state
    return "RUNNING"


def _job_dir(path: Path, model_dir: Path) -> Path:
    """What a user submits with --working-dir: an experiment file, its data and its DeepSpeed JSON, all named
    relative to the experiment file; the output is relative too (it goes under storage_path)."""
    from lopt_dist.data import generate_arithmetic_rows

    (path / "data").mkdir(parents=True)
    (path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in generate_arithmetic_rows(24, 0)))
    (path / "ds").mkdir()
    shutil.copy(REPO / "configs/deepspeed/zero0.json", path / "ds" / "zero0.json")
    (path / "exp.yaml").write_text(f"""
name: job
output_dir: runs/job
model: {{name: {model_dir}}}
data: {{source: data/train.jsonl, max_seq_length: 128}}
train: {{steps: 2, micro_batch_size: 2, micro_batches_per_step: 2}}
runtime:
  mode: ray
  groups: [{{deepspeed_config: ds/zero0.json}}, {{deepspeed_config: ds/zero0.json}}]
logging: {{progress: false}}
""")
    return path


def test_ray_job_submit_trains_and_exports(ray_head, tiny_model_dir, tmp_path):
    address, env, temp_dir = ray_head
    job_dir = _job_dir(tmp_path / "job", tiny_model_dir("llama"))
    storage = tmp_path / "storage"
    job_id = f"lopt-test-{secrets.token_hex(4)}"
    submit = [
        RAY, "job", "submit", "--address", address, "--submission-id", job_id, "--no-wait",
        "--working-dir", str(job_dir), "--", "lopt-train", "exp.yaml", "--set", f"storage_path={storage}",
    ]
    submitted = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    deadline = time.monotonic() + 600
    state = "RUNNING"
    while state == "RUNNING" and time.monotonic() < deadline:
        time.sleep(3)
        state = _job_status(address, env, job_id)
    logs = subprocess.run([RAY, "job", "logs", "--address", address, job_id], env=env, capture_output=True,
                          text=True, timeout=60).stdout
    assert state == "SUCCEEDED", logs[-4000:]
    assert "attaching to the Ray cluster" in logs
    out = storage / "runs" / "job"
    assert f"output: {out}" in logs  # the driver names the real location, not one relative to Ray's copy
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.tie_word_embeddings is False
    assert (out / "checkpoints" / "step_000002" / "state.json").is_file()
    assert not list(temp_dir.glob("**/runs/job")), "nothing may be written into Ray's copy of the working directory"
