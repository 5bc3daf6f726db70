import json
from pathlib import Path

import pandas as pd
import pytest

from lopt_dist.config import DataConfig
from lopt_dist.data import (
    IGNORE_INDEX, DataError, MicroBatches, build_examples, generate_arithmetic_rows, load_rows,
)

GSM8K_TRAIN = Path(__file__).parents[2].parent / "shared/data/gsm8k/train.jsonl"

ROWS = [
    {"instruction": "Say hi.", "input": "", "output": "hi"},
    {"instruction": "Add.", "input": "2 and 3", "output": "5"},
    {"instruction": "Count.", "input": "a b c", "output": "3"},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_builtin_arithmetic_respects_seed_and_sizes():
    rows = load_rows(DataConfig(builtin_samples=50, seed=7))
    assert rows == generate_arithmetic_rows(50, seed=7)
    assert load_rows(DataConfig(builtin_samples=50, seed=7, max_samples=10)) == rows[:10]


def test_unknown_builtin_is_an_error():
    with pytest.raises(DataError, match="builtin:arithmetic"):
        load_rows(DataConfig(source="builtin:poetry"))


def test_local_jsonl(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", ROWS)
    assert load_rows(DataConfig(source=str(path))) == ROWS
    assert load_rows(DataConfig(source=str(path), max_samples=2)) == ROWS[:2]


def test_local_json_list(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(ROWS))
    assert load_rows(DataConfig(source=str(path))) == ROWS


def test_local_parquet(tmp_path):
    path = tmp_path / "train.parquet"
    pd.DataFrame(ROWS).to_parquet(path)
    assert load_rows(DataConfig(source=str(path), max_samples=2)) == ROWS[:2]


def test_missing_local_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rows(DataConfig(source=str(tmp_path / "nope.jsonl")))


def test_build_examples_detects_format_and_masks_prompts(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "train.jsonl", ROWS)
    built = build_examples(DataConfig(source=str(path)), tokenizer)
    assert built.format == "instruction" and len(built) == 3 and built.rows == 3
    assert built.skipped_bad == 0 and built.skipped_too_long == 0
    for example in built.examples:
        completion = [t for t in example["labels"] if t != IGNORE_INDEX]
        assert completion == example["input_ids"][-len(completion):]


def test_bad_row_is_an_error_or_skipped_and_counted(tmp_path, tokenizer):
    rows = [*ROWS[:2], {"instruction": "No output here."}, ROWS[2]]
    path = _write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=r"row 2 does not fit format 'instruction'.*'output' is missing"):
        build_examples(DataConfig(source=str(path)), tokenizer)
    built = build_examples(DataConfig(source=str(path), skip_bad_rows=True), tokenizer)
    assert len(built) == 3 and built.skipped_bad == 1


def test_forced_format_that_does_not_fit(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(DataError, match=r"train\.jsonl lacks column\(s\) question, answer that format 'gsm8k' needs"):
        build_examples(DataConfig(source=str(path), format="gsm8k"), tokenizer)


def test_too_long_prompts_are_counted(tmp_path, tokenizer):
    rows = [*ROWS, {"instruction": "word " * 200, "output": "ok"}]
    path = _write_jsonl(tmp_path / "train.jsonl", rows)
    built = build_examples(DataConfig(source=str(path), max_seq_length=64), tokenizer)
    assert len(built) == 3 and built.skipped_too_long == 1
    assert all(len(e["input_ids"]) <= 64 for e in built.examples)


def test_no_usable_rows_is_an_error(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "train.jsonl", [{"instruction": "x"}])
    with pytest.raises(DataError, match="no usable examples"):
        build_examples(DataConfig(source=str(path), format="instruction", skip_bad_rows=True), tokenizer)


def test_builtin_examples_feed_micro_batches(tokenizer):
    built = build_examples(DataConfig(builtin_samples=20), tokenizer)
    assert built.format == "gsm8k" and len(built) == 20
    batches = MicroBatches(built, micro_batch_size=4, shuffle=True, seed=0, pad_token_id=tokenizer.pad_token_id)
    batch = batches.get(0)
    first = built[batches.example_indices(0)[0]]
    n = len(first["input_ids"])
    assert batch["input_ids"][0, :n].tolist() == first["input_ids"]
    assert "#### " in tokenizer.decode([t for t in batch["labels"][0].tolist() if t != IGNORE_INDEX])


@pytest.mark.skipif(not GSM8K_TRAIN.is_file(), reason=f"{GSM8K_TRAIN} is absent")
def test_real_gsm8k_file(tokenizer):
    cfg = DataConfig(source=str(GSM8K_TRAIN), max_samples=64, max_seq_length=512)
    built = build_examples(cfg, tokenizer)
    assert built.format == "gsm8k" and built.rows == 64 and len(built) == 64
    first = load_rows(cfg)[0]
    assert first["question"].startswith("Natalia sold clips") and first["answer"].endswith("#### 72")


def test_jsonl_errors_name_file_and_line_and_skipping_counts_them(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"instruction": "x",\n' + "[1, 2]\n" + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl row 1 \(line 3\): not valid JSON \(.* at column \d+\)"):
        build_examples(DataConfig(source=str(path)), tokenizer)
    built = build_examples(DataConfig(source=str(path), skip_bad_rows=True), tokenizer)
    assert (built.rows, len(built), built.skipped_bad) == (4, 2, 2)
    with pytest.raises(DataError, match=r"row 1 \(line 3\): not valid JSON"):
        load_rows(DataConfig(source=str(path)))


def test_json_file_array_lines_and_syntax_error(tmp_path, tokenizer):
    lines = tmp_path / "lines.json"
    lines.write_text("".join(json.dumps(r) + "\n" for r in ROWS))  # JSON Lines under a .json name
    assert load_rows(DataConfig(source=str(lines))) == ROWS
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(ROWS, indent=1)[:-3])
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON \(.* at line \d+, column \d+\); a \.json file"):
        load_rows(DataConfig(source=str(broken)))
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps([ROWS[0], "text", ROWS[1]]))
    built = build_examples(DataConfig(source=str(mixed), skip_bad_rows=True), tokenizer)
    assert (built.rows, len(built), built.skipped_bad) == (3, 2, 1)


def test_lengths_are_counted_before_cutting(tmp_path, tokenizer):
    rows = [*ROWS, {"instruction": "Echo.", "output": " ".join(str(i) for i in range(100))}]
    built = build_examples(DataConfig(source=str(_write_jsonl(tmp_path / "t.jsonl", rows)), max_seq_length=96),
                           tokenizer)
    assert (len(built), built.truncated, built.skipped_too_long) == (4, 1, 0)
    assert max(built.lengths) > 96 and all(len(e["input_ids"]) <= 96 for e in built.examples)
    assert "4 examples, 1 of them with the answer cut to data.max_seq_length=96" in built.summary(DataConfig(max_seq_length=96))
