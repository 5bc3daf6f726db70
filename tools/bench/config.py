"""The settings of one `lopt-bench` invocation, shared by every row so that all rows train the same thing.

Static rules (sizes that can never work) raise BenchConfigError here; rules that depend on the model or the
machine (layers per stage, GPUs per worker) are checked per row by `plan.py`, which skips that row with a
message instead of stopping the whole benchmark.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lopt_dist.config import ConfigError

# Rows in the order they run and are reported; "stage-alone" is the per-stage reference measurement.
ROWS = ("e2e", "lopt", "stage-alone", "pp", "zero2", "lopt-dist")
# Rows that train through lopt-dist's LocalTrainer / StageWorker and so honour train.dtype (and --data, --packing).
BF16_ROWS = ("e2e", "lopt", "lopt-dist")
# Schedules of torch.distributed.pipelining, by the name the CLI takes.
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zbv", "interleaved-zb")
RANDOM_PREFIX = "random:"
_DEEPSPEED = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"


class BenchConfigError(ConfigError):
    """Settings that can run in no row; the message names the option and what would work."""


def _require(ok: bool, option: str, message: str) -> None:
    if not ok:
        raise BenchConfigError(f"{option}: {message}")


@dataclass(kw_only=True)
class BenchConfig:
    # An alias (smollm2-135m), a checkpoint directory, a hub id, or "random:<family>" for a seeded random model
    # whose config is the family's tiny test config changed by `model_overrides` (e.g. hidden_size=1024).
    model: str = "smollm2-135m"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    seq_len: int = 128  # every sample has exactly this many tokens, no padding
    global_batch: int = 8  # samples per optimizer step, the same in every row
    micro_batches: int = 8  # micro-batches per optimizer step (gradient accumulation / pipeline micro-batches)
    workers: int = 2  # pipeline stages = pipeline ranks = data-parallel ranks = lopt-dist workers
    threads_per_worker: int = 1  # CPU: torch threads per worker; single-device rows get workers x this
    warmup_steps: int = 1  # steps run but not measured
    steps: int = 3  # measured steps
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # bfloat16: mixed precision as lopt-train's train.dtype; only the rows built on lopt-dist's trainers honour it
    dtype: Literal["float32", "bfloat16"] = "float32"
    rows: list[str] = field(default_factory=lambda: list(ROWS))
    schedules: list[str] = field(default_factory=lambda: ["gpipe", "1f1b", "interleaved-1f1b", "zbv"])
    boundaries: list[int] | None = None  # layer cut of the pipelines; None: as even as the layers allow
    channel_depth: int = 4  # lopt-dist: micro-batches a stage may run ahead of the next
    zero2_config: str = str(_DEEPSPEED / "zero2.json")  # DeepSpeed JSON of the data-parallel row; ZeRO stage 2
    # DeepSpeed JSON of the lopt-dist groups: as lopt-train's default configs for one-worker groups, ZeRO-0.
    lopt_dist_deepspeed_config: str = str(_DEEPSPEED / "zero0.json")
    # An lopt-dist data.source (builtin:arithmetic, a .jsonl file): rows train on its tokenized examples, cut from
    # the left to seq_len, right-padded per micro-batch (or packed with `packing`); tokens/s counts real tokens.
    data: str | None = None
    packing: bool = False  # --data rows packed several examples per row of seq_len tokens (data.packing)
    lr: float = 1e-5
    seed: int = 0
    out_dir: str = "bench-out"
    quick: bool = False  # recorded only: the preset that chose these values

    def __post_init__(self) -> None:
        _require(self.seq_len >= 2, "--seq-len", "must be >= 2 (the loss predicts the next token)")
        _require(self.global_batch >= 1, "--global-batch", "must be >= 1")
        _require(self.micro_batches >= 1, "--micro-batches", "must be >= 1")
        _require(
            self.global_batch % self.micro_batches == 0, "--micro-batches",
            f"{self.micro_batches} micro-batches do not divide the global batch of {self.global_batch} samples; "
            f"pick a divisor of {self.global_batch}, or a global batch that is a multiple of {self.micro_batches}",
        )
        _require(self.workers >= 2, "--workers", "must be >= 2: the pipelines need at least two stages")
        _require(self.threads_per_worker >= 1, "--threads-per-worker", "must be >= 1")
        _require(self.warmup_steps >= 1, "--warmup-steps",
                 "must be >= 1: the first step pays for allocation and lazy start-up")
        _require(self.steps >= 1, "--steps", "must be >= 1")
        _require(self.channel_depth >= 1, "--channel-depth", "must be >= 1")
        unknown = [r for r in self.rows if r not in ROWS]
        _require(not unknown and bool(self.rows), "--rows", f"{unknown or 'none'}: choose from {list(ROWS)}")
        fp32_only = [r for r in self.rows if r not in BF16_ROWS]
        _require(self.dtype == "float32" or not fp32_only, "--dtype",
                 f"the {fp32_only} rows train in float32 only; give --rows {','.join(BF16_ROWS)} with bfloat16")
        _require(not self.packing or self.data is not None, "--packing", "packs the examples of --data; give --data")
        _require(self.data is None or not self.is_random_model, "--data",
                 "tokenizes with the model's own tokenizer, which random models lack; give --model smollm2-135m or a "
                 "checkpoint directory")
        fixed = [r for r in self.rows if r not in BF16_ROWS]
        _require(self.data is None or not fixed, "--data",
                 f"the {fixed} rows train on fixed-length samples only; give --rows {','.join(BF16_ROWS)} with --data")
        unknown = [s for s in self.schedules if s not in SCHEDULES]
        _require(not unknown, "--schedules", f"unknown {unknown}: choose from {list(SCHEDULES)}")
        _require("pp" not in self.rows or bool(self.schedules), "--schedules", "give at least one for the pp rows")
        if self.boundaries is not None:
            _require(len(self.boundaries) == self.workers - 1, "--boundaries",
                     f"give {self.workers - 1} layer indices for {self.workers} stages, got {self.boundaries}")
        _require(_zero_stage(self.zero2_config, "--zero2-config") == 2, "--zero2-config",
                 f"{self.zero2_config} is not a ZeRO stage 2 config; the data-parallel row is ZeRO-2")
        _zero_stage(self.lopt_dist_deepspeed_config, "--lopt-dist-deepspeed-config")

    @property
    def micro_batch_size(self) -> int:
        return self.global_batch // self.micro_batches

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.steps

    @property
    def single_device_threads(self) -> int:
        """The threads of a single-device row: all the workers' threads together, for a fair CPU comparison."""
        return self.workers * self.threads_per_worker

    @property
    def is_random_model(self) -> bool:
        return self.model.startswith(RANDOM_PREFIX)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _zero_stage(path: str, option: str) -> int:
    """The ZeRO stage a DeepSpeed JSON file asks for (0 when it names none)."""
    _require(Path(path).is_file(), option, f"{path} does not exist; give a DeepSpeed JSON file")
    try:
        values = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise BenchConfigError(f"{option}: {path} is not valid JSON: {err}") from None
    _require(isinstance(values, dict), option, f"{path} must hold a JSON object")
    return int(values.get("zero_optimization", {}).get("stage", 0))


# `--quick`: a tiny random Llama and few short steps; the whole run takes about two minutes on two cores,
# almost all of it starting workers.
QUICK = dict(
    model="random:llama",
    model_overrides=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512),
    seq_len=32,
    global_batch=8,
    micro_batches=4,
    warmup_steps=1,
    steps=2,
)
