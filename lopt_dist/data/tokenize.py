"""Tokenizing one (prompt, completion) pair for supervised fine-tuning, with the prompt masked out of the loss.

The prompt is rendered with the tokenizer's chat template when it has one (ending with the header of the
assistant's turn), else as plain text: the message contents separated by blank lines, then a newline.
The completion follows, closed by the eos token so the model learns to stop. Prompt and completion are
tokenized separately, so the boundary between them is exact and the labels can mask the prompt.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from lopt_dist.data.formats import Message

IGNORE_INDEX = -100  # label value that torch's cross entropy skips


def encode_example(
    tokenizer: PreTrainedTokenizerBase, prompt_messages: list[Message], completion: str, max_seq_length: int
) -> dict[str, list[int]] | None:
    """{"input_ids", "labels"} of prompt + completion + eos, cut to `max_seq_length` tokens from the right.

    Labels are IGNORE_INDEX on the prompt. Returns None when the cut leaves no completion token at all (the
    prompt alone fills `max_seq_length`): such an example would carry no loss, so callers count and drop it.
    """
    return cut_example(*encode_pair(tokenizer, prompt_messages, completion), max_seq_length)


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, prompt_messages: list[Message], completion: str
) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids + eos), uncut, so that callers can tell how much a cut removes."""
    prompt_ids = encode_prompt(tokenizer, prompt_messages)
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        completion_ids.append(tokenizer.eos_token_id)
    return prompt_ids, completion_ids


def cut_example(prompt_ids: list[int], completion_ids: list[int], max_seq_length: int) -> dict[str, list[int]] | None:
    """The example `encode_example` describes, from `encode_pair`'s output."""
    input_ids = (prompt_ids + completion_ids)[:max_seq_length]
    if len(input_ids) <= len(prompt_ids):
        return None
    labels = [IGNORE_INDEX] * len(prompt_ids) + input_ids[len(prompt_ids):]
    return {"input_ids": input_ids, "labels": labels}


def encode_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> list[int]:
    """Token ids of the prompt, ready for the model to write the assistant's answer next."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The template writes any special tokens it wants (bos, turn headers); do not add them twice.
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "\n\n".join(m["content"] for m in messages) + "\n"
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])
