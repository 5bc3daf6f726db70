"""lopt-dist: LoPT post-training of Hugging Face causal LMs, one Ray worker group per stage.

The Python API (the README's "Python API" section):

    import lopt_dist

    cfg = lopt_dist.load_config("configs/default.yaml", ["train.steps=20"])     # a YAML file with --set overrides
    cfg = lopt_dist.ExperimentConfig(                                          # or built in code
        model=lopt_dist.ModelConfig(name="smollm2-135m"),
        train=lopt_dist.TrainConfig(steps=20, lr=5e-5),
    )
    result = lopt_dist.train(cfg)    # a RunResult: output_dir, records (one dict per step), checkpoint, model_dir

`train` runs the same checks, training, checkpoints and export as `lopt-train`; a problem the user can fix raises
ConfigError, DataError or ModelStructureError with a one-line message.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from lopt_dist.config import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    GroupConfig,
    LoggingConfig,
    ModelConfig,
    RuntimeConfig,
    TrainConfig,
    config_from_dict,
    load_config,
)

try:
    __version__ = version("lopt-dist")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

if TYPE_CHECKING:
    from lopt_dist.run import RunResult

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "EvalConfig", "ExperimentConfig", "GroupConfig", "LoggingConfig",
    "ModelConfig", "RunResult", "RuntimeConfig", "TrainConfig", "__version__", "config_from_dict", "load_config",
    "train",
]


def __getattr__(name: str) -> Any:
    # The run machinery (torch, transformers, Ray) is imported on first use, not by `import lopt_dist.config` in
    # every worker. `lopt_dist.train` itself is the training subpackage, made callable (lopt_dist/train/__init__.py).
    if name == "train":
        import importlib

        return importlib.import_module("lopt_dist.train")
    if name == "RunResult":
        from lopt_dist.run import RunResult

        return RunResult
    raise AttributeError(f"module 'lopt_dist' has no attribute {name!r}")
