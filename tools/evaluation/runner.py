"""`evaluate(EvalConfig) -> dict`: load the model once, compute the asked-for figures, describe how."""

from __future__ import annotations

import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lopt_dist.data import DataError
from lopt_dist.model.loading import load_causal_lm, load_tokenizer, resolve_model_path

from .accuracy import gsm8k_accuracy
from .config import EvalConfig, EvalError
from .likelihood import answer_loss, retention_perplexity
from .sources import Problem, load_problems, load_retention_text, retention_windows


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """{"figures", "counts", "settings", "records"}; a figure that was not asked for is None."""
    cfg.validate()
    transformers.set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    # Read every input before the model: a bad file should fail in a second, not after a long load.
    data = cfg.data_path()
    problems, fmt = _problems(data, cfg) if data is not None else ([], None)
    retention = load_retention_text(cfg.retention_text) if cfg.num_windows else None
    windows = retention_windows(tokenizer, retention, cfg.window, cfg.num_windows) if retention else []
    model = _load_model(cfg)

    result: dict[str, Any] = {
        "figures": {"answer_loss": None, "accuracy": None, "retention_perplexity": None},
        "counts": {},
        "settings": _settings(cfg, model, data, fmt, retention.source if retention else None),
        "records": [],
    }
    with torch.inference_mode():
        _task_figures(result, model, tokenizer, problems, cfg)
        if windows:
            ppl = retention_perplexity(model, windows, cfg.batch_size, tokenizer.pad_token_id, cfg.progress)
            result["figures"]["retention_perplexity"] = ppl.perplexity
            result["counts"]["retention"] = {"windows": ppl.windows, "tokens": ppl.tokens, "mean_nll": ppl.mean_nll}
    return result


def _task_figures(result: dict[str, Any], model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                  problems: list[Problem], cfg: EvalConfig) -> None:
    # Both figures use the first rows of the file, so a smaller count is a prefix of a larger one.
    if cfg.num_loss:
        loss = answer_loss(model, tokenizer, problems[:cfg.num_loss], cfg.max_seq_length, cfg.batch_size,
                           cfg.progress)
        result["figures"]["answer_loss"] = loss.loss
        result["counts"]["answer_loss"] = {"examples": loss.examples, "tokens": loss.tokens,
                                           "skipped_too_long": loss.skipped_too_long}
    if cfg.num_accuracy:
        acc = gsm8k_accuracy(model, tokenizer, problems[:cfg.num_accuracy], cfg.max_new_tokens, cfg.batch_size,
                             cfg.progress)
        result["figures"]["accuracy"] = acc.accuracy
        result["counts"]["accuracy"] = {"problems": acc.problems, "correct": acc.correct,
                                        "unscorable_references": acc.unscorable}
        result["records"] = acc.records_json()


def _problems(data: Path, cfg: EvalConfig) -> tuple[list[Problem], str]:
    try:
        return load_problems(data, cfg.format, max(cfg.num_loss, cfg.num_accuracy))
    except DataError as err:
        raise EvalError(f"data file {data}: {err} (lopt-eval reads the format with --format)") from None


def _load_model(cfg: EvalConfig) -> PreTrainedModel:
    try:
        model = load_causal_lm(cfg.model, dtype=cfg.torch_dtype())
    except FileNotFoundError as err:  # an alias whose weights package is missing says how to install it
        raise EvalError(str(err)) from None
    return model.to(cfg.torch_device()).eval()


def _settings(cfg: EvalConfig, model: PreTrainedModel, data: Path | None, fmt: str | None,
              retention_source: str | None) -> dict[str, Any]:
    settings = asdict(cfg)
    settings.update(
        model_path=str(Path(resolve_model_path(cfg.model)).resolve()),
        data=str(data.resolve()) if data is not None else None,
        format=fmt,
        retention_text=retention_source,
        device=str(model.device),
        versions={"torch": torch.__version__, "transformers": transformers.__version__,
                  "python": platform.python_version()},
    )
    del settings["progress"]  # how the run looked, not what it measured
    return settings
