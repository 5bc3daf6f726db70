"""Tokenizing one (prompt, completion) pair for supervised fine-tuning, with the prompt masked out of the loss.

With `prompt_format="chat"` the prompt is rendered with the tokenizer's chat template when it has one (ending
with the header of the assistant's turn, with `data.chat_template_kwargs` such as `enable_thinking`), else as
plain text: the message contents separated by blank lines, then a newline. With `prompt_format="plain"` (the
paper's reference implementation) it is `Question: {prompt}\nAnswer:` and the completion starts with a space.
The completion follows, closed by the eos token so the model learns to stop. Prompt and completion are
tokenized separately, so the boundary between them is exact and the labels can mask the prompt. A row without
prompt (the `text` format) is the tokenizer's own start (its bos token, if it adds one) and then the text.

An example longer than `max_seq_length` is cut (`cut_lengths`): "right" cuts the end, "left" cuts the prompt
from its start so that the completion is kept whole (its end is cut only if it alone does not fit).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from lopt_dist.data.formats import Message

IGNORE_INDEX = -100  # label value that torch's cross entropy skips


@dataclass(frozen=True)
class PromptStyle:
    """How prompts are written: data.prompt_format and data.chat_template_kwargs."""

    prompt_format: str = "chat"  # "chat" or "plain"
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, data) -> PromptStyle:
        """From a DataConfig."""
        return cls(data.prompt_format, dict(data.chat_template_kwargs))


CHAT = PromptStyle()


def encode_example(
    tokenizer: PreTrainedTokenizerBase, prompt_messages: list[Message], completion: str, max_seq_length: int,
    style: PromptStyle = CHAT, truncation: str = "right",
) -> dict[str, list[int]] | None:
    """{"input_ids", "labels"} of prompt + completion + eos, cut to `max_seq_length` tokens (`truncation`).

    Labels are IGNORE_INDEX on the prompt. Returns None when the cut leaves no completion token at all (with
    "right", the prompt alone fills `max_seq_length`): such an example would carry no loss, so callers count and
    drop it.
    """
    return cut_example(*encode_pair(tokenizer, prompt_messages, completion, style), max_seq_length, truncation)


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, prompt_messages: list[Message], completion: str, style: PromptStyle = CHAT
) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids + eos), uncut, so that callers can tell how much a cut removes."""
    prompt_ids = encode_prompt(tokenizer, prompt_messages, style)
    if style.prompt_format == "plain" and prompt_messages:
        completion = " " + completion  # "Answer:" then " {answer}", as one text would be tokenized
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        completion_ids.append(tokenizer.eos_token_id)
    return prompt_ids, completion_ids


def cut_lengths(prompt: int, completion: int, max_seq_length: int, truncation: str = "right") -> tuple[int, int]:
    """(prompt tokens kept, completion tokens kept) of an example cut to `max_seq_length`.

    "right" keeps the start; "left" drops prompt tokens from the start until the completion fits, keeping at least
    one prompt token (the one the completion's first token is predicted from) when there is a prompt.
    """
    if prompt + completion <= max_seq_length:
        return prompt, completion
    if truncation == "left":
        kept = max(min(prompt, 1), max_seq_length - completion)
        return kept, min(completion, max_seq_length - kept)
    kept = min(prompt, max_seq_length)
    return kept, max_seq_length - kept


def cut_example(prompt_ids: list[int], completion_ids: list[int], max_seq_length: int,
                truncation: str = "right") -> dict[str, list[int]] | None:
    """The example `encode_example` describes, from `encode_pair`'s output."""
    kept_prompt, kept_completion = cut_lengths(len(prompt_ids), len(completion_ids), max_seq_length, truncation)
    if kept_completion == 0:
        return None
    prompt = prompt_ids[len(prompt_ids) - kept_prompt:]
    completion = completion_ids[:kept_completion]
    return {"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion}


def encode_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[Message], style: PromptStyle = CHAT) -> list[int]:
    """Token ids of the prompt, ready for the model to write the assistant's answer next."""
    if not messages:  # a row without prompt (`text`): only what the tokenizer puts at the start of any text
        return list(tokenizer("", add_special_tokens=True)["input_ids"])
    if style.prompt_format == "plain":
        return list(tokenizer(plain_prompt(messages), add_special_tokens=True)["input_ids"])
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             **style.chat_template_kwargs)
        # The template writes any special tokens it wants (bos, turn headers); do not add them twice.
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "\n\n".join(m["content"] for m in messages) + "\n"
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def plain_prompt(messages: list[Message]) -> str:
    """The reference implementation's prompt: `Question: ...` per user turn, `Answer: ...` per assistant turn
    (a system message as it is), ending with `Answer:` for the model to continue."""
    lines = []
    for message in messages:
        prefix = {"user": "Question: ", "assistant": "Answer: "}.get(message["role"], "")
        lines.append(prefix + message["content"])
    return "\n".join(lines) + "\nAnswer:"
