import pytest

from lopt_dist.data import DataError, detect_format, parse_row


def test_gsm8k():
    prompt, completion = parse_row({"question": "2+2?", "answer": "2+2=4\n#### 4"}, "gsm8k", 0)
    assert prompt == [{"role": "user", "content": "2+2?"}]
    assert completion == "2+2=4\n#### 4"


def test_instruction_with_and_without_input():
    row = {"instruction": "Translate to French.", "input": "cat", "output": "chat"}
    assert parse_row(row, "instruction", 0) == ([{"role": "user", "content": "Translate to French.\n\ncat"}], "chat")
    for empty in ({"input": ""}, {"input": None}, {}):
        row = {"instruction": "Say hi.", "output": "hi", **empty}
        assert parse_row(row, "instruction", 0) == ([{"role": "user", "content": "Say hi."}], "hi")


def test_prompt_completion_text_and_messages():
    assert parse_row({"prompt": "Hi", "completion": "Hello"}, "prompt_completion", 0) == (
        [{"role": "user", "content": "Hi"}], "Hello")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert parse_row({"prompt": chat, "completion": "Hello"}, "prompt_completion", 0) == (chat, "Hello")


def test_messages_last_assistant_turn_is_the_completion():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]
    prompt, completion = parse_row({"messages": messages}, "messages", 0)
    assert prompt == messages[:-1] and completion == "Goodbye"


@pytest.mark.parametrize(
    "columns, expected",
    [
        (["question", "answer"], "gsm8k"),
        (["instruction", "input", "output"], "instruction"),
        (["instruction", "output"], "instruction"),
        (["prompt", "completion", "id"], "prompt_completion"),
        (["messages", "source"], "messages"),
    ],
)
def test_detect_format(columns, expected):
    assert detect_format(columns) == expected


def test_detect_format_failure_lists_the_formats():
    with pytest.raises(DataError) as err:
        detect_format(["body"])
    message = str(err.value)
    assert "['body']" in message and "question, answer" in message and "data.format" in message


@pytest.mark.parametrize(
    "row, fmt, names",
    [
        ({"question": "q"}, "gsm8k", ["'answer' is missing", "question, answer"]),
        ({"question": "q", "answer": None}, "gsm8k", ["'answer' is missing"]),
        ({"question": "q", "answer": 4}, "gsm8k", ["'answer' must be non-empty text"]),
        ({"instruction": "x", "output": "y", "input": 3}, "instruction", ["'input' must be text"]),
        ({"prompt": "", "completion": "y"}, "prompt_completion", ["'prompt' must be non-empty text"]),
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages", ["end with an assistant message"]),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "messages", ["messages[0]"]),
        ({"messages": "hello"}, "messages", ["non-empty list of messages"]),
    ],
)
def test_bad_rows_name_row_format_and_columns(row, fmt, names):
    with pytest.raises(DataError) as err:
        parse_row(row, fmt, 17)
    message = str(err.value)
    assert message.startswith(f"row 17 does not fit format '{fmt}'")
    assert f"the row has columns {sorted(row)}" in message
    for name in names:
        assert name in message


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)
