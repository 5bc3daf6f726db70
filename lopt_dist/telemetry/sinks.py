"""Where each step's record goes: metrics.jsonl always, and the sinks `logging.report_to` lists, behind one
interface (`write(record)`, `close()`).

- `tensorboard`: the numeric fields as scalars (torch's SummaryWriter; the `tensorboard` package).
- `wandb`: one W&B run per output_dir (its id kept in output_dir/wandb_run_id, so `--resume` continues the same run),
  files under output_dir/wandb; `WANDB_MODE=offline` logs without a server (`wandb sync` uploads later).
- `mlflow`: one MLflow run per output_dir (id in output_dir/mlflow_run_id), the config as parameters, the records as
  metrics; the tracking server from `logging.mlflow_tracking_uri`, else MLFLOW_TRACKING_URI, else MLflow's default.

Every record is logged at step `record["step"] + 1` (steps completed). The W&B and MLflow packages are optional
(`pip install 'lopt-dist[tracking]'`); preflight refuses a run that lists one that is not installed.
"""

from __future__ import annotations

import importlib.util
import uuid
from pathlib import Path
from typing import Any, Protocol

from lopt_dist.config import ConfigError, ExperimentConfig
from lopt_dist.telemetry.metrics import MetricsLog, TensorBoardLog

_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
_INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install 'lopt-dist[tracking]' (or wandb)",
            "mlflow": "pip install 'lopt-dist[tracking]' (or mlflow-skinny)"}


class Sink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def check_sinks(cfg: ExperimentConfig) -> None:
    """Before start: every sink listed can be imported (ConfigError naming the package to install)."""
    for name in cfg.logging.report_to:
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            raise ConfigError(f"logging.report_to: {name} needs the {_PACKAGES[name]} package, which is not installed; "
                              f"{_INSTALL[name]}, or remove {name} from logging.report_to")


class Sinks:
    """metrics.jsonl plus the sinks of `logging.report_to`, written together, closed together."""

    def __init__(self, cfg: ExperimentConfig, out: Path, start_step: int) -> None:
        # A resumed run (start_step > 0) drops the records of the steps it will redo from metrics.jsonl.
        self.sinks: list[Sink] = [MetricsLog(out / "metrics.jsonl", start_step)]
        try:
            for name in cfg.logging.report_to:
                self.sinks.append(_OPEN[name](cfg, out, start_step))
        except BaseException:
            self.close()
            raise

    def write(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def rewind(self, step: int) -> None:
        """The run restarted from the checkpoint of `step`: records from `step` on will be written again. The
        sinks that can drop them do (metrics.jsonl, TensorBoard); W&B keeps its first copy of a step and MLflow
        logs the step twice, with equal values, since a restart reproduces the same steps."""
        for sink in self.sinks:
            rewind = getattr(sink, "rewind", None)
            if rewind is not None:
                rewind(step)

    def close(self) -> None:
        for sink in reversed(self.sinks):
            sink.close()
        self.sinks = []


def numeric(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers, without its step (the sinks' own step axis)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class WandbLog:
    def __init__(self, cfg: ExperimentConfig, out: Path, start_step: int) -> None:
        import wandb

        run_id = _run_id(out / "wandb_run_id", start_step, lambda: uuid.uuid4().hex[:12])
        (out / "wandb").mkdir(exist_ok=True)
        self.run = wandb.init(project=cfg.logging.wandb_project, name=cfg.name, id=run_id, resume="allow",
                              dir=str(out), config=cfg.to_dict())

    def write(self, record: dict[str, Any]) -> None:
        self.run.log(numeric(record), step=record["step"] + 1)

    def close(self) -> None:
        self.run.finish()


class MlflowLog:
    def __init__(self, cfg: ExperimentConfig, out: Path, start_step: int) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        # The client API, not mlflow's process-wide active run: a user's own MLflow run stays untouched.
        self.client = MlflowClient(cfg.logging.mlflow_tracking_uri)
        name = cfg.logging.mlflow_experiment or cfg.name
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        id_file = out / "mlflow_run_id"
        if start_step > 0 and id_file.is_file():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=cfg.name).info.run_id
            id_file.write_text(self.run_id)
            params = [Param(k, str(v)[:6000]) for k, v in _flatten(cfg.to_dict()).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])

    def write(self, record: dict[str, Any]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, record["step"] + 1) for k, v in numeric(record).items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _open_tensorboard(cfg: ExperimentConfig, out: Path, start_step: int) -> TensorBoardLog:
    return TensorBoardLog(out / "tensorboard", start_step)


_OPEN = {"tensorboard": _open_tensorboard, "wandb": WandbLog, "mlflow": MlflowLog}


def _run_id(file: Path, start_step: int, new) -> str:
    """The tracker's run id of this output_dir: kept across --resume, new for a run that starts at step 0."""
    if start_step > 0 and file.is_file():
        return file.read_text().strip()
    run_id = new()
    file.write_text(run_id)
    return run_id


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
