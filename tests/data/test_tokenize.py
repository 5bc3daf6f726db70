from lopt_dist.data import IGNORE_INDEX, encode_example, encode_prompt

PROMPT = [{"role": "user", "content": "Mia has 3 apples and buys 2 more. How many does she have?"}]
COMPLETION = "3 + 2 = 5\n#### 5"


def _split(example):
    """(prompt length, completion ids) from the labels."""
    labels = example["labels"]
    n_prompt = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert all(label == IGNORE_INDEX for label in labels[:n_prompt])
    return n_prompt, example["input_ids"][n_prompt:]


def test_chat_template_prompt_and_masked_labels(tokenizer):
    example = encode_example(tokenizer, PROMPT, COMPLETION, max_seq_length=256)
    n_prompt, completion_ids = _split(example)
    # Labels equal the inputs exactly on the completion; the model is trained on nothing else.
    assert example["labels"][n_prompt:] == completion_ids
    assert len(example["labels"]) == len(example["input_ids"])
    rendered = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(example["input_ids"][:n_prompt]) == rendered
    assert rendered.endswith("<|im_start|>assistant\n")
    assert completion_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(completion_ids[:-1]) == COMPLETION


def test_plain_prompt_without_chat_template(plain_tokenizer):
    example = encode_example(plain_tokenizer, PROMPT, COMPLETION, max_seq_length=256)
    n_prompt, completion_ids = _split(example)
    assert plain_tokenizer.decode(example["input_ids"][:n_prompt]) == PROMPT[0]["content"] + "\n"
    assert plain_tokenizer.decode(completion_ids) == COMPLETION + plain_tokenizer.eos_token
    assert encode_prompt(plain_tokenizer, PROMPT) == example["input_ids"][:n_prompt]


def test_plain_prompt_joins_several_messages(plain_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert plain_tokenizer.decode(encode_prompt(plain_tokenizer, messages)) == "Be brief.\n\nHi\n"


def test_truncation_keeps_the_prompt_and_cuts_the_completion(tokenizer):
    full = encode_example(tokenizer, PROMPT, COMPLETION, max_seq_length=256)
    n_prompt, _ = _split(full)
    cut = encode_example(tokenizer, PROMPT, COMPLETION, max_seq_length=n_prompt + 3)
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 3]
    assert cut["labels"] == full["labels"][: n_prompt + 3]
    assert tokenizer.eos_token_id not in cut["input_ids"][n_prompt:]


def test_example_without_any_completion_token_is_dropped(tokenizer):
    n_prompt = len(encode_prompt(tokenizer, PROMPT))
    assert encode_example(tokenizer, PROMPT, COMPLETION, max_seq_length=n_prompt) is None
    assert encode_example(tokenizer, PROMPT, COMPLETION, max_seq_length=n_prompt + 1) is not None
