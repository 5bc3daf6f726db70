"""The embedded Ray is always a new local instance, and a worker's data error reaches the user as one line.

A real `ray start` head runs beside the test, recorded as "the latest cluster" in the Ray temp directory that
this process uses: exactly where a plain `ray.init()` would look for a cluster to join. It is started under its
own session with its own ports, temp dir and auth token, and stopped by signalling that process group only.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import ray
from ray._private.services import canonicalize_bootstrap_address, resolve_ip_for_localhost

from lopt_dist.cli import error_message
from lopt_dist.config import ConfigError, load_config
from lopt_dist.data import build_examples
from lopt_dist.model.loading import load_tokenizer
from lopt_dist.pipeline.driver import connect_ray, wait_for_ray
from lopt_dist.pipeline.errors import WorkerFailedError
from lopt_dist.pipeline.worker_group import wait_all
from tests.launcher.test_job_submit import RAY, _free_ports


@pytest.mark.parametrize(("address", "message"), [
    ("http://10.0.0.1:8265", r"RAY_ADDRESS: http://10\.0\.0\.1:8265 is a dashboard \(job submission\) address"),
    ("10.0.0.1", r"RAY_ADDRESS: '10\.0\.0\.1' is not a Ray address; give host:port"),
])
def test_addresses_that_are_not_ray_addresses_are_named(address, message):
    with pytest.raises(ConfigError, match=message):
        wait_for_ray(address, "RAY_ADDRESS", timeout_s=1)


@pytest.fixture(scope="module")
def foreign_head():
    """A head recorded in `$RAY_TMPDIR/ray/ray_current_cluster`; yields its GCS address once it is up."""
    root = Path("/tmp") / f"lopt-{secrets.token_hex(4)}"  # Ray's socket paths must stay short
    temp_dir = root / "ray"
    gcs, dashboard, client, node_mgr, obj_mgr, agent, agent_grpc, env_agent, metrics = _free_ports(9)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--include-dashboard=false", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
           f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}", "--num-cpus=4",
           f"--temp-dir={temp_dir}"]
    temp_dir.mkdir(parents=True)
    log = open(root / "head.log", "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    # `ray start` records the head here once it is up; writing the same line now lets the embedded instance
    # start while the head does (a plain ray.init() would wait for the head and join it).
    address = f"{resolve_ip_for_localhost('127.0.0.1')}:{gcs}"
    (temp_dir / "ray_current_cluster").write_text(address)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("RAY_TMPDIR", str(root))  # where this process's Ray looks for "the latest cluster"
            patch.delenv("RAY_ADDRESS", raising=False)
            yield address, lambda: _wait_for_port(head, gcs, root / "head.log")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        _stop(head)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def _wait_for_port(head: subprocess.Popen, port: int, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)


def _stop(head: subprocess.Popen) -> None:
    """SIGTERM the head's own process group, SIGKILL it after a few seconds (`ray start --block` is slow to go)."""
    pgid = os.getpgid(head.pid)
    os.killpg(pgid, signal.SIGTERM)
    try:
        head.wait(timeout=2)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def embedded(foreign_head):
    address, wait_until_up = foreign_head
    # What a plain ray.init() would join: the foreign head. Without this the test below could not fail.
    assert canonicalize_bootstrap_address(None) == address
    connect_ray(load_config(None, ["runtime.mode=ray", "runtime.ray_num_cpus=1"]))
    wait_until_up()
    yield address
    ray.shutdown()


def test_embedded_ray_never_joins_a_cluster_already_running(embedded):
    assert ray.get_runtime_context().gcs_address != embedded
    assert ray.cluster_resources()["CPU"] == 1  # runtime.ray_num_cpus, not the foreign head's 4


@ray.remote(num_cpus=1)
def _build_first_stage_data(data_cfg) -> int:
    return len(build_examples(data_cfg, load_tokenizer("smollm2-135m")))


def test_a_bad_row_found_by_a_worker_is_one_line_naming_row_and_source(embedded, tmp_path):
    # A dataset directory stands for a hub dataset: the driver checks its first rows, a worker finds row 150.
    (tmp_path / "ds").mkdir()
    rows = [{"question": "What is 2 + 3?", "answer": "#### 5"}] * 150 + [{"question": "no answer"}]
    (tmp_path / "ds" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, [f"data.source={tmp_path}/ds"])
    with pytest.raises(WorkerFailedError) as caught:
        wait_all({"stage 0 worker 0": _build_first_stage_data.remote(cfg.data)})
    message = error_message(caught.value)
    assert "\n" not in message
    assert message.startswith("stage 0 worker 0 raised: DataError: data.source ")
    assert f"{tmp_path}/ds row 150 does not fit format 'gsm8k': column 'answer' is missing" in message
