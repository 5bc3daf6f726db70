"""The evaluation's inputs: held-out problems read as training reads them, and general text for retention."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from lopt_dist.config import DataConfig
from lopt_dist.data import detect_format, load_rows, parse_row
from lopt_dist.data.formats import Message
from lopt_dist.data.retention import pydoc_topics, token_windows

from .config import EvalError


@dataclass(kw_only=True)
class Problem:
    """One held-out row: the prompt the model sees and the completion training would teach."""

    index: int  # row number in the file
    messages: list[Message]
    completion: str

    @property
    def question(self) -> str:
        return self.messages[-1]["content"]


@dataclass(kw_only=True)
class RetentionText:
    text: str
    source: str  # where it came from, for the result's settings


def load_problems(path: Path, fmt: str, count: int) -> tuple[list[Problem], str]:
    """The first `count` rows of `path` as problems, and the format they were read with."""
    rows = load_rows(DataConfig(source=str(path), max_samples=count))
    if not rows:
        raise EvalError(f"data file {path} has no rows; pass --data PATH to a file with held-out problems")
    fmt = detect_format(list(rows[0])) if fmt == "auto" else fmt
    problems = []
    for index, row in enumerate(rows):
        messages, completion = parse_row(row, fmt, index)
        problems.append(Problem(index=index, messages=messages, completion=completion))
    return problems, fmt


def load_retention_text(path: str | None) -> RetentionText:
    """`path`'s text, or by default the pydoc topics (lopt_dist/data/retention.py)."""
    if path is not None:
        return RetentionText(text=Path(path).expanduser().read_text(encoding="utf-8"), source=str(path))
    try:
        text, origin = pydoc_topics()
    except LookupError as err:
        raise EvalError(f"{err}; pass --retention-text PATH to a text file") from None
    return RetentionText(text=text, source=origin)


def retention_windows(
    tokenizer: PreTrainedTokenizerBase, retention: RetentionText, window: int, count: int
) -> list[list[int]]:
    """The first `count` non-overlapping windows of `window` tokens (fewer if the text runs out)."""
    windows = token_windows(tokenizer, retention.text, window, count)
    if not windows:
        length = len(tokenizer(retention.text, add_special_tokens=False, verbose=False)["input_ids"])
        raise EvalError(
            f"retention text {retention.source} has {length} tokens, fewer than one window of {window}; "
            f"give a longer --retention-text or a smaller --window"
        )
    return windows
