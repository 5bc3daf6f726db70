"""Turning a raw dataset row into a chat prompt and the completion the model learns to write.

Supported row formats (the columns each needs):
  gsm8k              question, answer
  instruction        instruction, output (input optional, appended to the instruction)
  prompt_completion  prompt (text, or a list of chat messages), completion
  messages           messages: chat turns; the last must be the assistant's and is the completion
  query_response     query, response (MetaMathQA, the paper's SFT data)
  text               text: plain text with no prompt, every token learned (continued pre-training, retention)
"auto" picks the format from a row's columns, in the order above from the most specific.
"""

from __future__ import annotations

from typing import Any

Message = dict[str, str]


class DataError(ValueError):
    """A user-fixable problem with the training data; the message names the row, format and columns."""


# Required columns, then optional ones, per format.
FORMAT_COLUMNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "messages": (("messages",), ()),
    "prompt_completion": (("prompt", "completion"), ()),
    "instruction": (("instruction", "output"), ("input",)),
    "gsm8k": (("question", "answer"), ()),
    "query_response": (("query", "response"), ()),
    "text": (("text",), ()),
}


def detect_format(columns: list[str] | tuple[str, ...] | set[str]) -> str:
    """The first format whose required columns are all present."""
    present = set(columns)
    for name, (required, _) in FORMAT_COLUMNS.items():
        if present.issuperset(required):
            return name
    raise DataError(
        f"cannot detect the data format from the columns {sorted(present)}; expected one of: "
        + "; ".join(f"{name} ({_describe(name)})" for name in FORMAT_COLUMNS)
        + ". Set data.format to force one."
    )


def _require_known(fmt: str) -> None:
    if fmt not in FORMAT_COLUMNS:
        raise DataError(f"unknown data format {fmt!r}; known formats: {sorted(FORMAT_COLUMNS)}")


def check_columns(columns: list[str], fmt: str, where: str) -> str:
    """The format rows with these columns will be read as ("auto" resolved), or DataError naming what is missing."""
    if fmt == "auto":
        try:
            return detect_format(columns)
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
    _require_known(fmt)
    missing = [c for c in FORMAT_COLUMNS[fmt][0] if c not in columns]
    if missing:
        raise DataError(
            f"{where} lacks column(s) {', '.join(missing)} that format {fmt!r} needs ({_describe(fmt)}); it has "
            f"{sorted(columns)}. Rename the columns, or set data.format to the format the file is in"
        )
    return fmt


def parse_row(row: dict[str, Any], fmt: str, index: int) -> tuple[list[Message], str]:
    """(prompt messages, completion) of `row`; DataError naming the row and the columns when it does not fit.
    The prompt is empty (no messages) for the `text` format."""
    _require_known(fmt)
    parser = _PARSERS[fmt]
    try:
        return parser(row)
    except _BadColumns as bad:
        raise DataError(
            f"row {index} does not fit format {fmt!r}: {bad}; the format needs {_describe(fmt)}, "
            f"the row has columns {sorted(row)}"
        ) from None


class _BadColumns(Exception):
    pass


def _describe(fmt: str) -> str:
    required, optional = FORMAT_COLUMNS[fmt]
    text = ", ".join(required)
    return text + (f" (optional: {', '.join(optional)})" if optional else "")


def _text(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if column not in row or value is None:
        raise _BadColumns(f"column {column!r} is missing")
    if not isinstance(value, str) or not value.strip():
        raise _BadColumns(f"column {column!r} must be non-empty text, got {_preview(value)}")
    return value


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _messages(value: Any, column: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise _BadColumns(f"column {column!r} must be a non-empty list of messages, got {_preview(value)}")
    for i, message in enumerate(value):
        ok = isinstance(message, dict) and all(isinstance(message.get(k), str) for k in ("role", "content"))
        if not ok:
            raise _BadColumns(f"{column}[{i}] must have text 'role' and 'content', got {_preview(message)}")
    # Keep only role and content: datasets fills absent keys of other messages with None.
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _parse_gsm8k(row: dict[str, Any]) -> tuple[list[Message], str]:
    return [{"role": "user", "content": _text(row, "question")}], _text(row, "answer")


def _parse_instruction(row: dict[str, Any]) -> tuple[list[Message], str]:
    prompt = _text(row, "instruction")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise _BadColumns(f"column 'input' must be text when present, got {_preview(extra)}")
    if extra and extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    return [{"role": "user", "content": prompt}], _text(row, "output")


def _parse_prompt_completion(row: dict[str, Any]) -> tuple[list[Message], str]:
    if isinstance(row.get("prompt"), list):
        prompt = _messages(row["prompt"], "prompt")
    else:
        prompt = [{"role": "user", "content": _text(row, "prompt")}]
    return prompt, _text(row, "completion")


def _parse_messages(row: dict[str, Any]) -> tuple[list[Message], str]:
    if row.get("messages") is None:
        raise _BadColumns("column 'messages' is missing")
    messages = _messages(row["messages"], "messages")
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise _BadColumns("column 'messages' must end with an assistant message that follows the prompt")
    if not messages[-1]["content"].strip():
        raise _BadColumns("the last assistant message is empty")
    return messages[:-1], messages[-1]["content"]


def _parse_query_response(row: dict[str, Any]) -> tuple[list[Message], str]:
    return [{"role": "user", "content": _text(row, "query")}], _text(row, "response")


def _parse_text(row: dict[str, Any]) -> tuple[list[Message], str]:
    return [], _text(row, "text")


_PARSERS = {
    "gsm8k": _parse_gsm8k,
    "query_response": _parse_query_response,
    "text": _parse_text,
    "instruction": _parse_instruction,
    "prompt_completion": _parse_prompt_completion,
    "messages": _parse_messages,
}
