"""Every check that can be made before Ray starts, in one pass: `prepare(cfg) -> cfg`.

In order: the model (path, config, structure, boundaries), its tokenizer, each group's DeepSpeed JSON, the
data (every row of a local file parsed, its columns checked and tokenized, with counts of rows cut, dropped
and skipped shown in one line; the first rows of a hub dataset) and last the output directory, created and
written to. Each failure is one ConfigError / DataError / ModelStructureError naming the key, file or row and
the fix; `lopt-train` prints it as one line and exits with 2. The README's "Checks before start" table
lists them.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from lopt_dist.config import ConfigError, ExperimentConfig
from lopt_dist.data import SFTExamples, build_examples
from lopt_dist.data.sources import BUILTIN_PREFIX, is_local_file
from lopt_dist.evaluation import eval_data_config, split_holdout
from lopt_dist.model.loading import load_model_config, load_tokenizer
from lopt_dist.model.lora import check_targets
from lopt_dist.model.parts import ModelStructureError, find_parts
from lopt_dist.model.selfcheck import check_family
from lopt_dist.model.weights import check_readable
from lopt_dist.model.stages import resolve_boundaries
from lopt_dist.paths import output_location
from lopt_dist.pipeline.deepspeed_json import check_deepspeed_json, read_deepspeed_json
from lopt_dist.telemetry.sinks import check_sinks

logger = logging.getLogger(__name__)

# Rows of a hub dataset read before start (streamed); the workers read and check the rest.
HUB_ROWS_CHECKED = 100


def prepare(cfg: ExperimentConfig) -> ExperimentConfig:
    """`cfg` with local paths made absolute (workers may run elsewhere), after every pre-start check passed."""
    cfg = _absolute_paths(cfg)
    check_schedule(cfg)
    hf_config = check_model(cfg)
    tokenizer = check_tokenizer(cfg)
    if cfg.runtime.mode == "ray":
        check_deepspeed(cfg)
    built = check_data(cfg, tokenizer, hf_config)
    check_evaluation(cfg, tokenizer, built)
    check_sinks(cfg)
    check_output_dir(cfg)  # last: it creates the directory, which a failed check should not leave behind
    return cfg


def check_schedule(cfg: ExperimentConfig) -> None:
    if cfg.train.warmup and cfg.train.warmup >= cfg.train.steps:
        logger.warning("train.warmup_steps=%d is not shorter than train.steps=%d: the learning rate rises for the whole "
                       "run and never reaches train.lr", cfg.train.warmup, cfg.train.steps)


def check_model(cfg: ExperimentConfig) -> PretrainedConfig:
    """The model's config; its layout and the boundaries checked against it, without loading any weight."""
    try:
        hf_config = load_model_config(cfg.model.name)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.name: cannot load a model config from {cfg.model.name!r}: {_one_line(err)}") from None
    check_not_quantized(cfg, hf_config)
    check_model_structure(cfg, hf_config)
    boundaries = resolve_boundaries(cfg.model.boundaries, hf_config.num_hidden_layers)
    # Refuse a family whose split (or packing, with data.packing) cannot be proven exact, from its config alone.
    if cfg.train.method == "lopt" or cfg.data.packing:
        check_family(hf_config, boundaries, cfg.model.attn_implementation, packed=cfg.data.packing)
    if cfg.runtime.mode == "ray":
        check_readable(cfg.model.name)  # stage workers read safetensors only: say so before they start
    return hf_config


def check_not_quantized(cfg: ExperimentConfig, hf_config: PretrainedConfig) -> None:
    """Quantized weights (FP8, GPTQ, bitsandbytes, ...) come with scales the stage loader does not apply: reading
    them as plain tensors would train from wrong values without a word, so such a checkpoint is refused."""
    quantization = getattr(hf_config, "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else type(quantization).__name__
        raise ConfigError(
            f"model.name: {cfg.model.name} is a quantized checkpoint (quant_method {method!r}); lopt-dist trains "
            "full-precision weights: use the model's bf16/fp32 release, or dequantize it and save_pretrained it"
        )


def check_model_structure(cfg: ExperimentConfig, hf_config: PretrainedConfig) -> None:
    """Build the model on the meta device (no weights, no memory) and find the parts a split needs."""
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
    except ValueError as err:  # transformers has no causal-LM class for this config
        raise ModelStructureError(
            f"model.name {cfg.model.name}: a {hf_config.model_type!r} model cannot be loaded as a causal LM "
            f"({_one_line(err)}); LoPT post-trains decoder-only causal LMs"
        ) from None
    try:
        parts = find_parts(model)
    except ModelStructureError as err:
        raise ModelStructureError(f"model.name {cfg.model.name}: {err}") from None
    check_targets(cfg.model, parts.layers, f"the decoder layers of {cfg.model.name}")  # model.lora


def check_tokenizer(cfg: ExperimentConfig) -> PreTrainedTokenizerBase:
    try:
        tokenizer = load_tokenizer(cfg.model.name)
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"model.name: cannot load a tokenizer from {cfg.model.name!r} ({_one_line(err)}); the "
                          "model directory needs its tokenizer files") from None
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"model.name: the tokenizer of {cfg.model.name} has neither a pad nor an eos token, so "
                          "batches cannot be padded; give the tokenizer an eos token")
    return tokenizer


def check_deepspeed(cfg: ExperimentConfig) -> None:
    """Each group's JSON against the experiment; what it says that lopt-dist replaces is shown once, here."""
    for i, group in enumerate(cfg.runtime.groups):
        key = f"runtime.groups[{i}].deepspeed_config"
        for warning in check_deepspeed_json(read_deepspeed_json(group.deepspeed_config, key), cfg, i, key):
            logger.warning("%s", warning)


def check_data(cfg: ExperimentConfig, tokenizer: PreTrainedTokenizerBase, hf_config: PretrainedConfig) -> SFTExamples:
    """Parse and tokenize every row of a local file (the first rows of a hub dataset) the way the workers will,
    and show what will be trained on in one line."""
    source = cfg.data.source
    if is_local_file(source) and not Path(source).expanduser().is_file():
        raise ConfigError(f"data.source: file {source} does not exist")
    from_hub = not source.startswith(BUILTIN_PREFIX) and not is_local_file(source)
    built = build_examples(cfg.data, tokenizer, limit=HUB_ROWS_CHECKED if from_hub else None)
    vocab = getattr(hf_config, "vocab_size", None)
    if vocab is not None and built.max_token_id >= vocab:
        raise ConfigError(f"model.name: the tokenizer produces token id {built.max_token_id} but the model has only "
                          f"{vocab} embeddings; use the tokenizer that belongs to {cfg.model.name}")
    scope = f" (its first {built.rows} rows; the workers check the rest)" if from_hub else ""
    lost = built.skipped_too_long or built.skipped_bad  # rows the user gave that will not be trained on
    logger.log(logging.WARNING if lost else logging.INFO, "data %s%s: %s", source, scope, built.summary(cfg.data))
    return built


def check_evaluation(cfg: ExperimentConfig, tokenizer: PreTrainedTokenizerBase, built: SFTExamples) -> None:
    """The held-out data reads as the training data does; a hold-out leaves examples on both sides."""
    evaluation = cfg.eval
    if evaluation.split and not evaluation.source and (is_local_file(cfg.data.source)
                                                       or cfg.data.source.startswith(BUILTIN_PREFIX)):
        kind = "a built-in dataset" if cfg.data.source.startswith(BUILTIN_PREFIX) else "a file"
        raise ConfigError(f"eval.split: {evaluation.split!r} names a split of a hub dataset, but data.source "
                          f"{cfg.data.source} is {kind}; give the held-out data in eval.source")
    if evaluation.source and is_local_file(evaluation.source) and not Path(evaluation.source).is_file():
        raise ConfigError(f"eval.source: file {evaluation.source} does not exist")
    if evaluation.holdout:
        _, held_out = split_holdout(built.examples, cfg)
        logger.info("eval.holdout=%g: %d of %d examples held out of training for evaluation", evaluation.holdout,
                    len(held_out), len(built.examples))
    elif evaluation.every and evaluation.held_out_sets:
        data = eval_data_config(cfg)
        hub = not data.source.startswith(BUILTIN_PREFIX) and not is_local_file(data.source)
        held = build_examples(data, tokenizer, limit=HUB_ROWS_CHECKED if hub else None)
        logger.info("eval %s%s: %s", data.source, f" split {data.split}" if hub else "", held.summary(data))


def check_output_dir(cfg: ExperimentConfig) -> None:
    """Create `output_dir` and write a file in it, naming what is in the way when that fails."""
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except FileExistsError:
        raise ConfigError(f"output_dir: {out} is a file; give a directory (it is created if missing)") from None
    except NotADirectoryError:
        blocker = next((p for p in reversed(out.parents) if p.exists() and not p.is_dir()), out)
        raise ConfigError(f"output_dir: cannot create {out}: {blocker} is a file, not a directory; choose "
                          "another output_dir") from None
    except (OSError, ValueError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise ConfigError(f"output_dir: cannot write in {out} ({reason}); choose a directory you can write, on "
                          "storage every node sees") from None


def _absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Every local path made absolute (workers may run elsewhere); where the run writes, per lopt_dist/paths.py."""
    # A directory the user named becomes absolute; an alias or hub id stays, so each node resolves it locally.
    local = Path(cfg.model.name).expanduser()
    model = dataclasses.replace(cfg.model, name=str(local.resolve()) if local.is_dir() else cfg.model.name)
    data = dataclasses.replace(cfg.data, source=_absolute_source(cfg.data.source))
    evaluation = cfg.eval
    if evaluation.source is not None:
        evaluation = dataclasses.replace(evaluation, source=_absolute_source(evaluation.source))
    groups = [dataclasses.replace(g, deepspeed_config=str(Path(g.deepspeed_config).resolve()))
              for g in cfg.runtime.groups]
    runtime = dataclasses.replace(cfg.runtime, groups=groups)
    try:
        output_dir = output_location(cfg.output_dir, cfg.storage_path, "output_dir")
        resume = cfg.checkpoint.resume
        if resume not in (None, "latest"):
            resume = str(output_location(resume, cfg.storage_path, "checkpoint.resume"))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    checkpoint = dataclasses.replace(cfg.checkpoint, resume=resume)
    return dataclasses.replace(cfg, output_dir=str(output_dir), model=model, data=data, eval=evaluation,
                               runtime=runtime, checkpoint=checkpoint)


def _absolute_source(source: str) -> str:
    path = Path(source).expanduser()
    return str(path.resolve()) if not source.startswith(BUILTIN_PREFIX) and path.exists() else source


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
