"""The reference recipe's data options: plain Question/Answer prompts, chat-template keyword arguments,
MetaMathQA and plain-text rows, and cutting long rows from the left (counted, never dropped silently)."""

import json

import pytest

from lopt_dist.config import DataConfig
from lopt_dist.data import IGNORE_INDEX, build_examples, encode_example, encode_prompt
from lopt_dist.data.tokenize import PromptStyle, cut_lengths

PROMPT = [{"role": "user", "content": "Mia has 3 apples and buys 2 more. How many does she have?"}]
COMPLETION = "3 + 2 = 5\n#### 5"
PLAIN = PromptStyle("plain")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_plain_prompt_format_is_question_answer_without_template(tokenizer):
    example = encode_example(tokenizer, PROMPT, COMPLETION, 256, style=PLAIN)
    n_prompt = example["labels"].count(IGNORE_INDEX)
    text = tokenizer.decode(example["input_ids"])
    assert text == f"Question: {PROMPT[0]['content']}\nAnswer: {COMPLETION}{tokenizer.eos_token}"
    assert tokenizer.decode(example["input_ids"][:n_prompt]).endswith("\nAnswer:")
    assert "<|im_start|>" not in text


def test_chat_template_kwargs_reach_the_template(tokenizer):
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)  # a copy we may change
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                               "{% if enable_thinking is defined and not enable_thinking %}<no-think>{% endif %}")
    plain = tokenizer.decode(encode_prompt(tokenizer, PROMPT))
    off = tokenizer.decode(encode_prompt(tokenizer, PROMPT, PromptStyle("chat", {"enable_thinking": False})))
    assert plain == PROMPT[0]["content"] and off == PROMPT[0]["content"] + "<no-think>"


def test_query_response_and_text_formats_are_detected_and_masked(tmp_path, tokenizer):
    query = _jsonl(tmp_path / "mm.jsonl", [{"query": "What is 2 + 2?", "response": "4", "type": "GSM_Rephrased"}])
    built = build_examples(DataConfig(source=query), tokenizer)
    assert built.format == "query_response"
    [example] = built.examples
    assert tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX]) == "4" + tokenizer.eos_token
    text = _jsonl(tmp_path / "t.jsonl", [{"text": "The cat sat on the mat."}])
    built = build_examples(DataConfig(source=text), tokenizer)
    assert built.format == "text"
    [example] = built.examples
    # No prompt: every token is learned (the first one has nothing before it to be predicted from).
    assert example["labels"] == example["input_ids"]
    assert tokenizer.decode(example["input_ids"]) == "The cat sat on the mat." + tokenizer.eos_token


@pytest.mark.parametrize(("prompt", "completion", "limit", "right", "left"), [
    (10, 5, 20, (10, 5), (10, 5)),  # fits
    (30, 5, 20, (20, 0), (15, 5)),  # the prompt alone fills it: right drops the row, left keeps the answer
    (10, 30, 20, (10, 10), (1, 19)),  # a long answer: left keeps one prompt token to predict it from
    (0, 30, 20, (0, 20), (0, 20)),  # no prompt
])
def test_cut_lengths(prompt, completion, limit, right, left):
    assert cut_lengths(prompt, completion, limit, "right") == right
    assert cut_lengths(prompt, completion, limit, "left") == left


def test_left_truncation_keeps_the_answer_and_counts_the_cut(tmp_path, tokenizer):
    numbers = " ".join(str(i) for i in range(60))
    rows = [{"question": f"Add {numbers}.", "answer": "#### 1770"}, {"question": "1 + 1?", "answer": "#### 2"}]
    source = _jsonl(tmp_path / "long.jsonl", rows)
    right = build_examples(DataConfig(source=source, max_seq_length=64), tokenizer)
    assert (len(right), right.skipped_too_long, right.prompt_cut) == (1, 1, 0)
    left = build_examples(DataConfig(source=source, max_seq_length=64, truncation="left"), tokenizer)
    assert (len(left), left.skipped_too_long, left.prompt_cut, left.truncated) == (2, 0, 1, 0)
    example = left.examples[0]
    assert len(example["input_ids"]) == 64
    answer = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(answer) == "#### 1770" + tokenizer.eos_token
    assert "1 of them with the prompt cut from its start" in left.summary(DataConfig(truncation="left"))
