"""What `lopt-eval` measures and on which inputs: one typed config, checked before any model is loaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from lopt_dist.data import FORMAT_COLUMNS
from lopt_dist.model.loading import ALIASES

# Where the workspace keeps the GSM8K test split, seen from a checkout beside it.
DEFAULT_DATA = Path("../shared/data/gsm8k/test.jsonl")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


class EvalError(ValueError):
    """A user-fixable problem with the evaluation's inputs; the message names the cause and the fix."""


@dataclass(kw_only=True)
class EvalConfig:
    model: str  # an exported Hugging Face model directory, or an alias such as smollm2-135m
    data: str | None = None  # held-out rows; None: DEFAULT_DATA when it exists
    format: str = "auto"  # row format of `data`, as lopt-dist's training reads it
    num_loss: int = 200  # first N rows for the teacher-forced answer loss; 0 skips it
    num_accuracy: int = 100  # first N rows for greedy generation + exact match; 0 skips it
    max_new_tokens: int = 256
    max_seq_length: int = 1024  # prompt + answer tokens kept for the answer loss, as in training
    retention_text: str | None = None  # None: the text of the standard library's pydoc_data.topics
    window: int = 256  # tokens per retention window
    num_windows: int = 32  # 0 skips retention
    batch_size: int = 8
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("num_loss", "num_accuracy", "num_windows"):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0 (0 skips that figure)")
        for name in ("max_new_tokens", "batch_size"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1")
        _require(self.window >= 2, "window must be >= 2 tokens: a window predicts all its tokens but the first")
        _require(self.max_seq_length >= 8, "max_seq_length must be >= 8")
        _require(self.format == "auto" or self.format in FORMAT_COLUMNS,
                 f"format must be auto or one of {sorted(FORMAT_COLUMNS)}, got {self.format!r}")
        _require(self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {self.device!r}")
        _require(self.dtype in ("float32", "bfloat16"), f"dtype must be float32 or bfloat16, got {self.dtype!r}")

    @property
    def needs_data(self) -> bool:
        return self.num_loss > 0 or self.num_accuracy > 0

    def data_path(self) -> Path | None:
        """The held-out file to read, or None when no task figure is asked for."""
        if not self.needs_data:
            return None
        if self.data is not None:
            return Path(self.data).expanduser()
        if DEFAULT_DATA.is_file():
            return DEFAULT_DATA
        raise EvalError(
            f"no --data given and the default GSM8K test file {DEFAULT_DATA} (relative to {Path.cwd()}) does not "
            f"exist; pass --data PATH to a .jsonl/.json/.parquet file, or --num-loss 0 --num-accuracy 0"
        )

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype == "bfloat16" else torch.float32

    def validate(self) -> None:
        """Checks that need the file system and the machine, so that a bad input fails before a long load."""
        _check_model(self.model)
        data = self.data_path()
        if data is not None:
            _require(data.is_file(), f"data file {data} does not exist; pass --data PATH to an existing file")
            _require(data.suffix.lower() in DATA_SUFFIXES,
                     f"data file {data} must end with one of {', '.join(DATA_SUFFIXES)}")
        if self.retention_text is not None and self.num_windows > 0:
            text = Path(self.retention_text).expanduser()
            _require(text.is_file(), f"retention text {text} does not exist; pass --retention-text PATH to a text "
                                     f"file, or leave it out to use the standard library's pydoc topics")
        _require(self.device != "cuda" or torch.cuda.is_available(),
                 "--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto")


def _check_model(name: str) -> None:
    if name in ALIASES:
        return
    path = Path(name).expanduser()
    _require(path.is_dir(), f"model directory {path} does not exist; give a Hugging Face model directory "
                            f"(for example one written by lopt-export) or an alias: {', '.join(sorted(ALIASES))}")
    _require((path / "config.json").is_file(),
             f"{path} is not a Hugging Face model directory (no config.json); export a checkpoint with lopt-export")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise EvalError(message)
