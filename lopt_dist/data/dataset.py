"""From `data.source` to tokenized SFT examples: reading records, parsing their format, tokenizing them.

The driver runs this over every row before any worker starts (a hub dataset: over its first rows) and shows
the counts; each first-stage worker runs the same code again to build its examples. Everything is
deterministic, so both see the same examples; the order of training is decided later, by `MicroBatches`.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from lopt_dist.config import DataConfig
from lopt_dist.data.formats import DataError, check_columns, parse_row
from lopt_dist.data.sources import BUILTIN_PREFIX, is_local_file, read_records
from lopt_dist.data.tokenize import PromptStyle, cut_example, cut_lengths, encode_pair

logger = logging.getLogger(__name__)

_SKIP_HINT = "Fix the row, or set data.skip_bad_rows: true to skip and count such rows"


@dataclass(kw_only=True)
class SFTExamples:
    """Tokenized examples ({"input_ids", "labels"} lists), and what was left out or cut on the way."""

    examples: list[dict[str, list[int]]]
    format: str  # the row format used (the detected one when data.format is "auto")
    rows: int  # records read, after max_samples (unreadable ones included)
    skipped_bad: int = 0  # records that could not be read or did not fit the format (data.skip_bad_rows)
    skipped_too_long: int = 0  # rows whose prompt alone fills data.max_seq_length: dropped (truncation "right")
    truncated: int = 0  # examples whose completion was cut to data.max_seq_length
    prompt_cut: int = 0  # examples whose prompt was cut from its start (truncation "left")
    lengths: list[int] = field(default_factory=list, repr=False)  # uncut tokens of each row that was encoded
    shortest_dropped_prompt: int | None = None  # tokens in the shortest prompt that filled max_seq_length
    max_token_id: int = -1

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]

    def summary(self, cfg: DataConfig) -> str:
        """One line for the user: what was read, kept, cut, dropped and skipped, and how long rows are."""
        parts = [f"{self.rows} rows read, format {self.format}: {len(self.examples)} examples"]
        if self.prompt_cut:
            parts[0] += (f", {self.prompt_cut} of them with the prompt cut from its start to fit "
                         f"data.max_seq_length={cfg.max_seq_length} (data.truncation=left)")
        if self.truncated:
            parts[0] += f", {self.truncated} of them with the answer cut to data.max_seq_length={cfg.max_seq_length}"
        if self.skipped_too_long:
            parts.append(f"{self.skipped_too_long} rows dropped because the prompt alone fills data.max_seq_length "
                         "(data.truncation=left keeps them, cutting the prompt)")
        if self.skipped_bad:
            parts.append(f"{self.skipped_bad} bad rows skipped (data.skip_bad_rows)")
        if self.lengths:
            parts.append(f"tokens per row before cutting: median {statistics.median_low(self.lengths)}, "
                         f"max {max(self.lengths)}")
        return "; ".join(parts)


def build_examples(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, limit: int | None = None) -> SFTExamples:
    """Read, parse and tokenize `cfg.source` (only its first `limit` records when given).

    A record that cannot be read or does not fit the format raises DataError naming the source, row and line,
    unless `cfg.skip_bad_rows`; rows whose prompt leaves no room for the completion are dropped and counted
    (`data.truncation: right`; "left" cuts such prompts instead), and
    no usable row at all is an error that says which limit to change.
    """
    built = SFTExamples(examples=[], format=cfg.format, rows=0)
    style = PromptStyle.of(cfg)
    columns_checked = False
    for record in read_records(cfg, limit):
        built.rows += 1
        if record.row is None:
            _bad_row(cfg, built, f"{record.where()}: {record.problem}")
            continue
        if not columns_checked:
            # The first row's columns decide the format ("auto"), or show that the file is in another one.
            if built.format == "auto" or not cfg.skip_bad_rows:
                built.format = check_columns(list(record.row), built.format, f"data.source {cfg.source}")
            columns_checked = True
        try:
            prompt, completion = parse_row(record.row, built.format, record.index)
        except DataError as err:
            _bad_row(cfg, built, f"{f'line {record.line}: ' if record.line else ''}{err}")
            continue
        _add(built, *encode_pair(tokenizer, prompt, completion, style), cfg.max_seq_length, cfg.truncation)
    if not built.examples:
        raise DataError(_nothing_usable(cfg, built, limit))
    if limit is None and not is_local_file(cfg.source) and not cfg.source.startswith(BUILTIN_PREFIX):
        # The pre-start line saw only a hub dataset's first rows: say what the whole dataset lost, here.
        level = logging.WARNING if built.skipped_too_long or built.skipped_bad else logging.INFO
        logger.log(level, "data %s, all rows: %s", cfg.source, built.summary(cfg))
    return built


def _bad_row(cfg: DataConfig, built: SFTExamples, what: str) -> None:
    if not cfg.skip_bad_rows:
        raise DataError(f"data.source {cfg.source} {what}. {_SKIP_HINT}")
    built.skipped_bad += 1


def _add(built: SFTExamples, prompt_ids: list[int], completion_ids: list[int], max_seq_length: int,
         truncation: str) -> None:
    built.lengths.append(len(prompt_ids) + len(completion_ids))
    example = cut_example(prompt_ids, completion_ids, max_seq_length, truncation)
    if example is None:
        built.skipped_too_long += 1
        shortest = built.shortest_dropped_prompt
        built.shortest_dropped_prompt = len(prompt_ids) if shortest is None else min(shortest, len(prompt_ids))
        return
    kept_prompt, kept_completion = cut_lengths(len(prompt_ids), len(completion_ids), max_seq_length, truncation)
    built.prompt_cut += kept_prompt < len(prompt_ids)
    built.truncated += kept_completion < len(completion_ids)
    built.max_token_id = max(built.max_token_id, *example["input_ids"])
    built.examples.append(example)


def _nothing_usable(cfg: DataConfig, built: SFTExamples, limit: int | None) -> str:
    if built.rows == 0:
        return f"data.source {cfg.source} has no rows"
    scope = f"the first {built.rows}" if limit is not None and built.rows == limit else f"all {built.rows}"
    reasons = []
    if built.skipped_too_long:
        reasons.append(f"{built.skipped_too_long} have prompts that fill data.max_seq_length={cfg.max_seq_length} "
                       f"(the shortest has {built.shortest_dropped_prompt} tokens): raise data.max_seq_length "
                       f"above {built.shortest_dropped_prompt}")
    if built.skipped_bad:
        reasons.append(f"{built.skipped_bad} could not be read or did not fit format {built.format!r}: check the "
                       "rows' columns and data.format")
    return f"no usable examples in {scope} rows of data.source {cfg.source}; " + "; ".join(reasons)
