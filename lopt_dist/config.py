"""The one typed configuration tree of a lopt-dist run.

YAML file -> `load_config` (with dotted `--set` overrides) -> `ExperimentConfig`. Static rules are checked in
each dataclass's `__post_init__`; rules that need the model or the cluster live in `validate_*` functions
next to what they check. Every worker receives the same object.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lopt_dist.paths import anchor_inputs


class ConfigError(ValueError):
    """A user-fixable problem in the configuration; the message names the key and what is allowed."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass(kw_only=True)
class LoraConfig:
    """LoRA adapters (the `peft` library) on the stages listed. Those stages train only their adapters (and their
    reconstruction decoders, always fully trained); the export merges the adapters into the weights."""

    stages: list[int] | None = None  # stage indices; None: every stage (for train.method=e2e: the whole model)
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    # Dropout on the adapters' input. It draws from each process's own random stream, so with dropout > 0 a Ray run
    # is not update-for-update equal to a local one (it is with 0, the default).
    dropout: float = 0.0
    # Names of the linear modules that get adapters (the last part of their name, e.g. q_proj).
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    def __post_init__(self) -> None:
        _require(self.rank >= 1, "rank", "must be >= 1")
        _require(self.alpha > 0, "alpha", "must be > 0")
        _require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        _require(bool(self.target_modules), "target_modules", "name at least one module, e.g. [q_proj]")
        if self.stages is not None:
            _require(bool(self.stages) and all(s >= 0 for s in self.stages), "stages",
                     f"must list stage indices >= 0, or be null for every stage; got {self.stages}")


@dataclass(kw_only=True)
class ModelConfig:
    # Alias (`smollm2-135m`), a local checkpoint directory, or a Hugging Face hub id.
    name: str = "smollm2-135m"
    # Layer indices where a new stage starts. None: one boundary at num_layers // 2 (two stages).
    boundaries: list[int] | None = None
    # Attention kernel passed to transformers; "sdpa" is fast, "eager" is the most portable.
    attn_implementation: str = "sdpa"
    # LoRA instead of full training, per stage: e.g. [{stages: [1], rank: 16}] adapts the second half only. Each
    # stage may appear in one entry at most; stages in none are trained in full. Empty: no LoRA.
    lora: list[LoraConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require(bool(self.name), "model.name", "must name an alias, a directory or a hub id")
        listed = [s for entry in self.lora for s in (entry.stages or [-1])]
        _require(len(listed) == len(set(listed)) and (-1 not in listed or len(self.lora) == 1), "model.lora",
                 "names a stage in more than one entry (an entry with stages: null covers every stage); give each "
                 "stage one entry")
        if self.boundaries is not None:
            _require(len(self.boundaries) >= 1, "model.boundaries", "give at least one boundary, or null")
            _require(all(b > 0 for b in self.boundaries), "model.boundaries", "boundaries must be > 0")
            _require(
                list(self.boundaries) == sorted(set(self.boundaries)),
                "model.boundaries",
                f"must be strictly increasing, got {self.boundaries}",
            )

    @property
    def num_stages(self) -> int:
        return 2 if self.boundaries is None else len(self.boundaries) + 1


@dataclass(kw_only=True)
class DataConfig:
    # "builtin:arithmetic" (seeded generator), a .jsonl/.json/.parquet path, or a hub dataset name.
    source: str = "builtin:arithmetic"
    hub_config: str | None = None  # e.g. "main" for openai/gsm8k
    split: str = "train"
    format: Literal["auto", "gsm8k", "instruction", "prompt_completion", "messages", "query_response", "text"] = "auto"
    # How a prompt is written: "chat" uses the tokenizer's chat template (plain text where it has none); "plain"
    # writes "Question: {prompt}\nAnswer: {answer}" without any template, as the paper's reference implementation.
    prompt_format: Literal["chat", "plain"] = "chat"
    # Keyword arguments for the chat template, e.g. {enable_thinking: false} for Qwen3.
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    max_seq_length: int = 256
    # An example longer than max_seq_length: "right" cuts the end of the answer, and a row whose prompt alone fills
    # max_seq_length is skipped (counted and shown before start); "left" cuts the prompt from its start so that
    # the answer is kept whole (the answer is cut at its end only if it alone does not fit).
    truncation: Literal["right", "left"] = "right"
    # Pack several examples into each row of max_seq_length tokens (attention and positions stay per example).
    packing: bool = False
    shuffle: bool = True
    seed: int = 0
    max_samples: int | None = None  # use only the first N rows (after loading, before shuffling)
    skip_bad_rows: bool = False  # False: a row that cannot be parsed is an error naming it
    builtin_samples: int = 2000  # size of the built-in task

    def __post_init__(self) -> None:
        _require(self.max_seq_length >= 8, "data.max_seq_length", "must be >= 8")
        _require(self.builtin_samples >= 1, "data.builtin_samples", "must be >= 1")
        if self.max_samples is not None:
            _require(self.max_samples >= 1, "data.max_samples", "must be >= 1 or null")


@dataclass(kw_only=True)
class TrainConfig:
    method: Literal["lopt", "e2e"] = "lopt"
    steps: int = 10  # optimizer steps
    micro_batch_size: int = 4  # samples per micro-batch
    micro_batches_per_step: int = 1  # gradient accumulation: micro-batches in one optimizer step
    lr: float = 1e-4  # last stage (and the whole model for e2e)
    lr_first: float | None = None  # earlier stages and their decoders; None: same as lr
    lambda_aux: float = 10.0  # weight of the reconstruction loss
    weight_decay: float = 0.0
    warmup_steps: int = 0
    warmup_ratio: float | None = None  # warm-up as a fraction of train.steps (rounded up); exclusive with warmup_steps
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    grad_clip: float = 1.0  # per stage; 0 disables
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # torch's default is [0.9, 0.999]
    adam_eps: float = 1e-8
    # Start of the reconstruction decoders' two linear layers: "normal" N(0, 0.02); "xavier" xavier-uniform with
    # gain 0.1 (the paper's reference implementation). Biases start at zero either way.
    decoder_init: Literal["normal", "xavier"] = "normal"
    dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0
    log_every: int = 1

    def __post_init__(self) -> None:
        _require(self.steps >= 1, "train.steps", "must be >= 1")
        _require(self.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
        _require(self.micro_batches_per_step >= 1, "train.micro_batches_per_step", "must be >= 1")
        _require(self.lr > 0, "train.lr", "must be > 0")
        _require(self.lr_first is None or self.lr_first > 0, "train.lr_first", "must be > 0 or null")
        _require(self.lambda_aux >= 0, "train.lambda_aux", "must be >= 0")
        _require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        # A warm-up longer than the run is allowed (a short trial of a long recipe); preflight warns about it.
        _require(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        if self.warmup_ratio is not None:
            _require(0 <= self.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)")
            _require(self.warmup_steps == 0, "train.warmup_ratio",
                     "cannot be combined with train.warmup_steps; give one of them")
        _require(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "train.adam_betas",
                 f"must be two numbers in [0, 1), e.g. [0.9, 0.999]; got {self.adam_betas}")
        _require(self.adam_eps > 0, "train.adam_eps", "must be > 0")
        _require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
        _require(self.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
        _require(self.log_every >= 1, "train.log_every", "must be >= 1")

    @property
    def samples_per_step(self) -> int:
        return self.micro_batch_size * self.micro_batches_per_step

    @property
    def first_lr(self) -> float:
        return self.lr if self.lr_first is None else self.lr_first

    @property
    def warmup(self) -> int:
        """Warm-up steps: train.warmup_steps, or train.warmup_ratio of train.steps rounded up."""
        if self.warmup_ratio is None:
            return self.warmup_steps
        return min(math.ceil(self.warmup_ratio * self.steps), self.steps - 1)


@dataclass(kw_only=True)
class GroupConfig:
    """One worker group: the data-parallel workers that train one stage."""

    workers: int = 1
    deepspeed_config: str = "configs/deepspeed/zero2.json"
    threads_per_worker: int = 1  # CPU runs: torch threads and Ray CPUs per worker

    def __post_init__(self) -> None:
        _require(self.workers >= 1, "runtime.groups[].workers", "must be >= 1")
        _require(self.threads_per_worker >= 1, "runtime.groups[].threads_per_worker", "must be >= 1")


@dataclass(kw_only=True)
class RuntimeConfig:
    # "local": one process, stage after stage. "ray": one Ray worker group per stage.
    mode: Literal["local", "ray"] = "local"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    groups: list[GroupConfig] = field(default_factory=lambda: [GroupConfig(), GroupConfig()])
    channel_depth: int = 4  # micro-batches a stage may run ahead of the next one
    transport: Literal["auto", "gloo", "nccl"] = "auto"
    ray_address: str | None = None  # None: RAY_ADDRESS if set, else an embedded local instance
    ray_num_cpus: int | None = None  # embedded instance only; None: all cores
    # GPUs each stage worker asks Ray for: 1, or a fraction (0.5) so that workers of different stages share a
    # GPU, e.g. a whole two-stage pipeline on a one-GPU machine. Ignored on CPU.
    gpus_per_worker: float = 1.0
    # placement groups and worker start-up; with device: cuda also how long to wait for an autoscaler's GPUs
    start_timeout_s: float = 120.0
    boundary_timeout_s: float = 900.0  # longest a stage may wait on its neighbour (start-up, a checkpoint)
    # Each group's torch.distributed (DeepSpeed) collectives: a ZeRO collective may wait behind another rank's
    # checkpoint write, so this is generous; NCCL's watchdog kills a rank after it.
    collective_timeout_s: float = 1800.0

    # ---- recovery (README: "Failures, hangs and preemption") ----
    # Worker failures (died, raised, hung) a Ray run recovers from by itself in one invocation: it restarts from the
    # newest checkpoint. 0: fail fast. User errors and a failure that repeats at the same step are never retried.
    max_failures: int = 3
    # Restart only the failed stage's group (the others keep their state) where that stays exact; else all stages.
    restart_stage_only: bool = True
    # Per sending worker: host memory for the activations sent since the next stage's last checkpoint, replayed to
    # a restarted next stage. A log that outgrows it makes a restart of that stage restart every stage. 0: no log.
    replay_buffer_size: int | str = "2GB"
    # A step is hung when it takes longer than `step_timeout_factor` x the median step time so far, and at least
    # `step_timeout_min_s`; the first step after a (re)start may take `first_step_timeout_s` (warm-up, catch-up).
    step_timeout_factor: float = 10.0
    step_timeout_min_s: float = 300.0
    first_step_timeout_s: float = 1800.0
    save_timeout_s: float = 1800.0  # longest a checkpoint save or load may take
    health_timeout_s: float = 30.0  # a worker that does not answer a status probe in this time is unresponsive
    # After SIGTERM/SIGINT: time to finish the steps already queued and commit a checkpoint before stopping.
    preemption_grace_s: float = 25.0

    def __post_init__(self) -> None:
        self._check_recovery()
        _require(self.channel_depth >= 1, "runtime.channel_depth", "must be >= 1")
        _require(len(self.groups) >= 1, "runtime.groups", "give one group per stage")
        _require(0 < self.gpus_per_worker <= 1, "runtime.gpus_per_worker",
                 f"must be in (0, 1] (a fraction shares a GPU between workers), got {self.gpus_per_worker}")
        _require(self.transport != "nccl" or self.gpus_per_worker == 1, "runtime.transport",
                 "'nccl' cannot connect workers that share a GPU (gpus_per_worker < 1); use 'auto', which moves "
                 "activations between such workers through pinned host memory")
        _require(self.start_timeout_s > 0, "runtime.start_timeout_s", "must be > 0")
        _require(self.boundary_timeout_s > 0, "runtime.boundary_timeout_s", "must be > 0")
        _require(self.collective_timeout_s > 0, "runtime.collective_timeout_s", "must be > 0")

    def _check_recovery(self) -> None:
        _require(self.max_failures >= 0, "runtime.max_failures", "must be >= 0 (0: fail fast)")
        size = parse_size(self.replay_buffer_size)
        _require(size is not None, "runtime.replay_buffer_size",
                 f"expected a number of bytes or a size such as '2GB' or '512MiB', got {self.replay_buffer_size!r}")
        _require(self.step_timeout_factor >= 1, "runtime.step_timeout_factor", "must be >= 1")
        for key in ("step_timeout_min_s", "first_step_timeout_s", "save_timeout_s", "health_timeout_s"):
            _require(getattr(self, key) > 0, f"runtime.{key}", "must be > 0")
        _require(self.preemption_grace_s >= 0, "runtime.preemption_grace_s", "must be >= 0")

    @property
    def replay_buffer_bytes(self) -> int:
        return parse_size(self.replay_buffer_size)


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: int | str) -> int | None:
    """Bytes from an integer or a string such as '5GB' (powers of 10) or '2GiB' (powers of 2); None if invalid."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        return None
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


@dataclass(kw_only=True)
class CheckpointConfig:
    save_every: int = 0  # optimizer steps between checkpoints; 0: only at the end
    keep_last: int = 2
    resume: str | None = None  # "latest" or a checkpoint directory
    # Start over in an output_dir that holds checkpoints, deleting them (lopt-train --overwrite). Without it such
    # a run is refused, so two runs never mix their checkpoints and metrics.
    overwrite: bool = False
    export: bool = True  # write a Hugging Face model at the end
    export_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: train.dtype (from the fp32 masters)
    export_shard_size: int | str = "5GB"  # largest safetensors shard of the export: bytes, or "500MB", "2GiB"
    # End this invocation after this many steps in all (with a checkpoint), e.g. for time-limited allocations;
    # resume later with --resume. None: train to train.steps.
    stop_after: int | None = None

    def __post_init__(self) -> None:
        _require(self.save_every >= 0, "checkpoint.save_every", "must be >= 0")
        _require(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
        _require(self.stop_after is None or self.stop_after >= 1, "checkpoint.stop_after", "must be >= 1 or null")
        _require(not (self.overwrite and self.resume), "checkpoint.overwrite",
                 "cannot be combined with checkpoint.resume: --resume continues the run, --overwrite deletes it")
        size = parse_size(self.export_shard_size)
        _require(size is not None and size >= 1, "checkpoint.export_shard_size",
                 f"expected a number of bytes or a size such as '5GB' or '500MiB', got {self.export_shard_size!r}")

    @property
    def export_shard_bytes(self) -> int:
        return parse_size(self.export_shard_size)


@dataclass(kw_only=True)
class LoggingConfig:
    progress: bool = True
    # Where each step's record goes besides output_dir/metrics.jsonl (always written: resume and lopt-plot read it).
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=list)
    wandb_project: str = "lopt-dist"  # W&B project; the run is named after `name` (WANDB_MODE=offline works)
    mlflow_tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else MLflow's default
    mlflow_experiment: str | None = None  # None: the run's `name`

    def __post_init__(self) -> None:
        _require(len(set(self.report_to)) == len(self.report_to), "logging.report_to",
                 f"lists a sink twice: {self.report_to}")
        _require(bool(self.wandb_project), "logging.wandb_project", "must not be empty")


@dataclass(kw_only=True)
class EvalConfig:
    """Evaluation on held-out data during training: answer loss per stage every `every` steps."""

    every: int = 0  # optimizer steps between evaluations (and after the last step); 0: no evaluation
    # Held-out data, read like data.source (same format, tokenizer and max_seq_length); None: see `split` and
    # `holdout`. Relative paths in a YAML file are relative to that file.
    source: str | None = None
    split: str | None = None  # hub split of `source` (or of data.source when source is None), e.g. "test"
    # Fraction of data.source's examples held out of training and evaluated instead (when source and split
    # are None); the split is seeded by data.seed, so it is the same on every worker and after a resume.
    holdout: float = 0.0
    micro_batches: int = 4  # held-out micro-batches of train.micro_batch_size evaluated each time, always the same
    # Also the perplexity of general text (the pydoc topics of the standard library, as lopt-eval measures it):
    # what the model keeps of its language modelling while it learns the task.
    retention: bool = False

    def __post_init__(self) -> None:
        _require(self.every >= 0, "eval.every", "must be >= 0 (0: no evaluation)")
        _require(0 <= self.holdout < 1, "eval.holdout", f"must be in [0, 1), got {self.holdout}")
        _require(self.micro_batches >= 1, "eval.micro_batches", "must be >= 1")
        _require(not (self.holdout and (self.source or self.split)), "eval.holdout",
                 "holds out part of data.source; it cannot be combined with eval.source or eval.split")
        if self.every:
            _require(bool(self.source or self.split or self.holdout or self.retention), "eval.every",
                     "evaluates nothing: give eval.source (a held-out file or dataset), eval.split (a hub split), "
                     "eval.holdout (a fraction of data.source) or eval.retention: true")

    @property
    def held_out_sets(self) -> bool:
        """Whether answer loss is evaluated (besides retention)."""
        return bool(self.source or self.split or self.holdout)


@dataclass(kw_only=True)
class ExperimentConfig:
    name: str = "lopt"
    # Where metrics, checkpoints and the model go. A relative output_dir is relative to the current directory, or
    # to storage_path when that is given (required for a relative output_dir under `ray job submit`).
    output_dir: str = "runs/lopt"
    storage_path: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _require(self.storage_path is None or Path(self.storage_path).expanduser().is_absolute(), "storage_path",
                 f"must be an absolute directory (on storage every node sees), got {self.storage_path!r}")
        if self.runtime.mode == "ray":
            stages = self.model.num_stages
            _require(
                len(self.runtime.groups) == stages,
                "runtime.groups",
                f"has {len(self.runtime.groups)} groups but the model is cut into {stages} stages; "
                "give one group per stage",
            )
            _require(self.train.method == "lopt", "train.method",
                     "the Ray pipeline trains 'lopt' only; use runtime.mode=local for 'e2e'")
            per_step = self.train.micro_batches_per_step
            need = math.lcm(*(g.workers for g in self.runtime.groups))
            _require(
                per_step % need == 0,
                "train.micro_batches_per_step",
                f"is {per_step} but must be a multiple of {need}, the least common multiple of the group "
                f"sizes {[g.workers for g in self.runtime.groups]}, so every worker gets whole micro-batches",
            )
        self._check_lora()

    def _check_lora(self) -> None:
        stages = self.model.num_stages
        for entry in self.model.lora:
            bad = [s for s in entry.stages or [] if s >= stages]
            _require(not bad, "model.lora[].stages",
                     f"{bad}: the model is cut into {stages} stages, numbered 0 to {stages - 1}")
            _require(self.train.method == "lopt" or entry.stages is None, "model.lora[].stages",
                     "train.method=e2e trains the whole model: give one entry with stages: null")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------- loading


def _convert(value: Any, hint: Any, key: str) -> Any:
    """Check (and lightly coerce) a YAML value against a dataclass field's type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        _require(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return _build(hint, value, key)
    if origin in (types.UnionType, typing.Union):
        if value is None:
            _require(type(None) in args, key, "may not be null")
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a valid {_describe(hint)}")
    if origin is Literal:
        _require(value in args, key, f"must be one of {list(args)}, got {value!r}")
        return value
    if hint is Any:
        return value
    if origin is dict:
        _require(isinstance(value, dict) and all(isinstance(k, str) for k in value), key,
                 f"expected a mapping of names to values, e.g. {{enable_thinking: false}}, got {value!r}")
        return {k: _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        _require(isinstance(value, list), key, f"expected a list, got {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        _require(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key,
                 f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        _require(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} at {key}")


def _describe(hint: Any) -> str:
    return " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in typing.get_args(hint))


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"{where}: unknown key; allowed keys here are {sorted(names)}")
    kwargs = {}
    for key, value in values.items():
        where = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _convert(value, hints[key], where)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        if prefix and not str(err).startswith(prefix):
            raise ConfigError(f"{prefix}.{err}") from None
        raise


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.steps=4")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item}: the value {raw!r} is not valid YAML ({_yaml_problem(err)}); close "
                          "brackets and quotes, e.g. model.boundaries=[8, 16] or data.source='a: b.jsonl'") from None
    return key.strip().split("."), value


def _yaml_problem(err: yaml.YAMLError) -> str:
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    return f"{problem}, {context}" if context else problem


def _read_yaml(path: Path) -> dict[str, Any]:
    """The file's top-level mapping; ConfigError naming the file, line and column of a syntax error."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path}: cannot read it ({err})") from None
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark, start = getattr(err, "problem_mark", None), getattr(err, "context_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        if mark and start and start.line != mark.line:  # e.g. a key without ':' is noticed a line later
            where += f" (in what starts at line {start.line + 1})"
        raise ConfigError(f"{where}: not valid YAML ({_yaml_problem(err)}); fix the syntax there (indentation, "
                          "a missing ':' or an unclosed bracket or quote)") from None
    _require(isinstance(loaded, dict), str(path), "the top level must be a mapping")
    return loaded


def _apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            _require(part.isdigit() and int(part) < len(node), ".".join(path[: i + 1]),
                     f"list index out of range (the list has {len(node)} entries)")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    last = path[-1]
    if isinstance(node, list):
        _require(last.isdigit() and int(last) < len(node), ".".join(path), "list index out of range")
        node[int(last)] = value
    else:
        node[last] = value


def config_from_dict(tree: dict[str, Any]) -> ExperimentConfig:
    return _build(ExperimentConfig, tree, "")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment file (or the defaults when path is None) and apply `--set` overrides.

    Relative input paths in the file are relative to the file's directory; in `--set` values, to the current
    directory (lopt_dist/paths.py says which keys are inputs).
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        tree = _read_yaml(path)
        anchor_inputs(tree, path.parent.resolve())
    if overrides and "runtime" in tree and "groups" in tree["runtime"]:
        tree["runtime"]["groups"] = [dict(g) for g in tree["runtime"]["groups"]]
    for item in overrides:
        keys, value = _parse_override(item)
        if keys[:2] == ["runtime", "groups"] and "groups" not in tree.get("runtime", {}):
            tree.setdefault("runtime", {})["groups"] = [dataclasses.asdict(g) for g in RuntimeConfig().groups]
        _apply_override(tree, keys, value)
    return config_from_dict(tree)
