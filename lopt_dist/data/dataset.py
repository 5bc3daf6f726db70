"""From `data.source` to tokenized SFT examples: loading rows, parsing their format, tokenizing them.

Every worker builds the same examples from the same config, so all of this is deterministic; the order of
training is decided later, by `MicroBatches`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from lopt_dist.config import DataConfig
from lopt_dist.data.arithmetic import generate_arithmetic_rows
from lopt_dist.data.formats import DataError, check_columns, detect_format, parse_row
from lopt_dist.data.tokenize import encode_example

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
_LOCAL_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(kw_only=True)
class SFTExamples:
    """Tokenized examples ({"input_ids", "labels"} lists), and what was left out on the way."""

    examples: list[dict[str, list[int]]]
    format: str  # the row format used (the detected one when data.format is "auto")
    rows: int  # rows loaded, after max_samples
    skipped_bad: int  # rows that did not fit the format (data.skip_bad_rows)
    skipped_too_long: int  # rows whose prompt alone fills data.max_seq_length

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


def load_rows(cfg: DataConfig) -> list[dict[str, Any]]:
    """The raw rows named by `cfg.source`, cut to `cfg.max_samples`.

    Local files hold a single split, so `cfg.split` and `cfg.hub_config` apply to hub datasets only.
    """
    source = cfg.source
    if source.startswith(BUILTIN_PREFIX):
        return _builtin_rows(source[len(BUILTIN_PREFIX):], cfg)
    if Path(source).suffix.lower() in _LOCAL_LOADERS:
        return _local_rows(Path(source).expanduser(), cfg.max_samples)
    # A hub name, or a local dataset directory that `datasets` knows how to read.
    return _take(datasets.load_dataset(source, cfg.hub_config, split=cfg.split), cfg.max_samples)


def build_examples(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> SFTExamples:
    """Load, parse and tokenize `cfg.source`. A row that does not fit the format raises DataError naming it,
    unless `cfg.skip_bad_rows`; rows whose prompt leaves no room for the completion are always dropped."""
    rows = load_rows(cfg)
    if not rows:
        raise DataError(f"data.source {cfg.source!r} has no rows")
    fmt = detect_format(list(rows[0])) if cfg.format == "auto" else cfg.format
    examples, bad, too_long = [], 0, 0
    for index, row in enumerate(rows):
        try:
            prompt, completion = parse_row(row, fmt, index)
        except DataError:
            if not cfg.skip_bad_rows:
                raise
            bad += 1
            continue
        example = encode_example(tokenizer, prompt, completion, cfg.max_seq_length)
        if example is None:
            too_long += 1
        else:
            examples.append(example)
    if not examples:
        raise DataError(
            f"no usable examples in {cfg.source!r}: {len(rows)} rows, {bad} did not fit format {fmt!r}, "
            f"{too_long} had prompts filling data.max_seq_length={cfg.max_seq_length}"
        )
    logger.info("data %s: %d examples (format %s) from %d rows; skipped %d bad rows, %d with no room for the answer",
                cfg.source, len(examples), fmt, len(rows), bad, too_long)
    return SFTExamples(examples=examples, format=fmt, rows=len(rows), skipped_bad=bad, skipped_too_long=too_long)


def check_local_file(cfg: DataConfig) -> None:
    """Fail in a second, before any worker starts, when a local file's first row cannot fit `cfg.format`.

    Reads only the first record (JSONL line or Parquet schema); a `.json` array or a hub dataset is checked
    when the workers load it. With `skip_bad_rows` and a fixed format, a bad first row is only skipped later."""
    if cfg.skip_bad_rows and cfg.format != "auto":
        return
    path = Path(cfg.source).expanduser()
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        columns = pq.read_schema(path).names
    elif suffix == ".jsonl":
        with path.open() as fh:
            first = next((line for line in fh if line.strip()), None)
        if first is None:
            raise DataError(f"data.source {cfg.source!r} has no rows")
        try:
            row = json.loads(first)
        except json.JSONDecodeError as err:
            raise DataError(f"data.source {cfg.source!r}: the first line is not JSON ({err})") from None
        if not isinstance(row, dict):
            raise DataError(f"data.source {cfg.source!r}: rows must be JSON objects, the first is {type(row).__name__}")
        columns = list(row)
    else:
        return
    check_columns(columns, cfg.format, f"data.source {cfg.source}")


def _builtin_rows(name: str, cfg: DataConfig) -> list[dict[str, Any]]:
    if name != "arithmetic":
        raise DataError(f"data.source: unknown built-in dataset {BUILTIN_PREFIX}{name}; known: builtin:arithmetic")
    # The generator is sequential, so generating fewer rows gives exactly the first rows of the full set.
    count = cfg.builtin_samples if cfg.max_samples is None else min(cfg.builtin_samples, cfg.max_samples)
    return generate_arithmetic_rows(count, cfg.seed)


def _local_rows(path: Path, max_samples: int | None) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(
            f"data.source: file {path} does not exist (give a .jsonl/.json/.parquet file, a hub dataset name, "
            f"or builtin:arithmetic)"
        )
    loaded = datasets.load_dataset(_LOCAL_LOADERS[path.suffix.lower()], data_files=str(path), split="train")
    return _take(loaded, max_samples)


def _take(dataset: Any, max_samples: int | None) -> list[dict[str, Any]]:
    # Cut before converting to Python objects: a large hub dataset would not fit as dicts.
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.select(range(max_samples))
    return dataset.to_list()
