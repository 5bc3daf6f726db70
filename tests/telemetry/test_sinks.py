"""Every sink of `logging.report_to` gets every record, offline: TensorBoard events, a W&B offline run (read back
from its run file), an MLflow file store. W&B and MLflow are optional packages (`lopt-dist[tracking]`): their
tests are skipped where they are not installed.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from lopt_dist.config import ConfigError, load_config
from lopt_dist.telemetry import sinks as sinks_module
from lopt_dist.telemetry.sinks import Sinks, check_sinks

RECORDS = [{"step": 0, "task_loss": 2.5, "lr_0": 1e-4, "grad_norm_0": 0.75},
           {"step": 1, "task_loss": 2.0, "lr_0": 2e-4, "grad_norm_0": 0.5, "eval_task_loss": 2.25}]


def _log(cfg, out: Path, records, start_step=0):
    sinks = Sinks(cfg, out, start_step)
    for record in records:
        sinks.write(record)
    sinks.close()


def test_metrics_jsonl_is_always_written_and_sinks_are_checked_before_start(tmp_path, monkeypatch):
    _log(load_config(None, []), tmp_path, RECORDS)
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == RECORDS
    monkeypatch.setattr(sinks_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"logging\.report_to: wandb needs the wandb package, which is not "
                                          r"installed; pip install 'lopt-dist\[tracking\]'"):
        check_sinks(load_config(None, ["logging.report_to=[wandb]"]))


def test_tensorboard_gets_every_number(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log(load_config(None, ["logging.report_to=[tensorboard]"]), tmp_path, RECORDS)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("task_loss")] == [(1, 2.5), (2, 2.0)]
    assert [(e.step, e.value) for e in events.Scalars("eval_task_loss")] == [(2, 2.25)]


def test_wandb_offline_run_gets_every_record_and_resume_continues_it(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None, ["logging.report_to=[wandb]", "name=sink-test"])
    _log(cfg, tmp_path, RECORDS[:1])
    run_id = (tmp_path / "wandb_run_id").read_text()
    _log(cfg, tmp_path, RECORDS[1:], start_step=1)  # a resumed run logs into the same W&B run
    assert (tmp_path / "wandb_run_id").read_text() == run_id
    history = [row for f in sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
               for row in _wandb_history(f)]
    assert [(row["_step"], row["task_loss"]) for row in history] == [(1, 2.5), (2, 2.0)]
    assert history[1]["eval_task_loss"] == 2.25 and history[0]["grad_norm_0"] == 0.75


def test_mlflow_file_store_gets_config_and_every_record(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store for tests like this one
    uri = (tmp_path / "mlruns").as_uri()
    cfg = load_config(None, ["logging.report_to=[mlflow]", f"logging.mlflow_tracking_uri={uri}", "name=sink-test",
                             "train.steps=7"])
    _log(cfg, tmp_path, RECORDS[:1])
    _log(cfg, tmp_path, RECORDS[1:], start_step=1)
    client = MlflowClient(uri)
    run = client.get_run((tmp_path / "mlflow_run_id").read_text())
    assert run.data.params["train.steps"] == "7" and run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "task_loss")] == [(1, 2.5), (2, 2.0)]
    assert client.get_experiment(run.info.experiment_id).name == "sink-test"


def _wandb_history(path: Path) -> list[dict]:
    """The history rows of a W&B offline run file: a LevelDB-style log (7-byte file header, 32 KiB blocks of
    records with a 7-byte header: crc, length, type) of protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, pending, rows = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return rows
