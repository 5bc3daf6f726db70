"""lopt-eval on a tiny random model: figures, their stability, the answer parser's verdicts, the CLI's errors."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lopt_dist.data import encode_example
from lopt_dist.model.loading import load_causal_lm
from tools.eval import main
from tools.evaluation import EvalConfig, EvalError, answer_loss, evaluate, load_problems, load_retention_text
from tools.evaluation import retention_windows
from tools.evaluation.accuracy import greedy_answers, score

ROWS = [
    {"question": "What is 1000 + 234?", "answer": "1000 + 234 = 1,234\n#### 1,234"},
    {"question": "What is 3 - 8?", "answer": "We subtract: 3 - 8 = -5\n#### -5"},
    {"question": "What is half of 5?", "answer": "5 / 2 = 2.5\n#### 2.5"},
]
TEXT = "The quick brown fox jumps over the lazy dog. " * 12  # about 120 tokens: seven windows of 16


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("eval-inputs")
    data = root / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    text = root / "retention.txt"
    text.write_text(TEXT)
    return {"model": tiny_model_dir("llama"), "data": data, "text": text}


def _config(inputs, **overrides) -> EvalConfig:
    values = dict(model=str(inputs["model"]), data=str(inputs["data"]), num_loss=3, num_accuracy=3,
                  max_new_tokens=8, retention_text=str(inputs["text"]), window=16, num_windows=3, batch_size=2,
                  device="cpu", progress=False)
    return EvalConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def result(inputs):
    return evaluate(_config(inputs))


def test_figures_are_finite_and_in_range(result):
    figures = result["figures"]
    assert math.isfinite(figures["answer_loss"]) and figures["answer_loss"] > 0
    assert math.isfinite(figures["retention_perplexity"]) and figures["retention_perplexity"] > 1
    assert 0 <= figures["accuracy"] <= 1
    assert result["counts"]["retention"] == {"windows": 3, "tokens": 3 * 15,
                                             "mean_nll": pytest.approx(math.log(figures["retention_perplexity"]))}
    assert result["counts"]["answer_loss"]["examples"] == 3 and result["counts"]["accuracy"]["problems"] == 3


def test_two_runs_give_identical_results(inputs, result):
    again = evaluate(_config(inputs))
    assert again["figures"] == result["figures"]
    assert again["records"] == result["records"]


def test_settings_say_how_the_figures_were_made(inputs, result):
    settings = result["settings"]
    assert settings["data"] == str(inputs["data"].resolve()) and settings["format"] == "gsm8k"
    assert (settings["num_loss"], settings["max_new_tokens"], settings["window"]) == (3, 8, 16)
    assert settings["retention_text"] == str(inputs["text"])
    assert settings["versions"]["torch"] == torch.__version__


def test_records_read_references_with_commas_and_negatives(result):
    assert [r["reference"] for r in result["records"]] == ["1234", "-5", "2.5"]
    for record in result["records"]:
        assert record["correct"] == (record["predicted"] == record["reference"])


def test_scoring_a_generation(inputs):
    problems, _ = load_problems(inputs["data"], "auto", 3)
    assert score(problems[0], "1000 + 234 is 1234.").correct
    assert score(problems[1], "The answer is\n#### -5").correct
    assert not score(problems[1], "The answer is 5").correct
    wordy = score(problems[0], "I do not know.")
    assert wordy.predicted is None and not wordy.correct


def test_answer_loss_equals_a_manual_computation(inputs, smol_tokenizer):
    problems, _ = load_problems(inputs["data"], "auto", 1)
    model = load_causal_lm(str(inputs["model"])).eval()
    example = encode_example(smol_tokenizer, problems[0].messages, problems[0].completion, 1024)
    ids = torch.tensor([example["input_ids"]])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    answer = [t for t, label in enumerate(example["labels"]) if label != -100]
    manual = -sum(log_probs[t - 1, example["input_ids"][t]].item() for t in answer) / len(answer)
    with torch.no_grad():
        computed = answer_loss(model, smol_tokenizer, problems, 1024, batch_size=1)
    assert computed.tokens == len(answer)
    assert computed.loss == pytest.approx(manual, rel=1e-5)


def test_padding_does_not_change_the_figures(inputs, smol_tokenizer):
    problems, _ = load_problems(inputs["data"], "auto", 3)
    model = load_causal_lm(str(inputs["model"])).eval()
    with torch.no_grad():
        alone = answer_loss(model, smol_tokenizer, problems, 1024, batch_size=1)
        batched = answer_loss(model, smol_tokenizer, problems, 1024, batch_size=3)
        # Left padding: each row of a batch continues exactly as it would on its own.
        together = greedy_answers(model, smol_tokenizer, problems, max_new_tokens=6)
        single = [greedy_answers(model, smol_tokenizer, [p], max_new_tokens=6)[0] for p in problems]
    assert batched.loss == pytest.approx(alone.loss, rel=1e-5)
    assert together == single


def test_default_retention_text_is_the_pydoc_topics(smol_tokenizer):
    text = load_retention_text(None)
    assert text.source.endswith("pydoc_data/topics.py") and len(text.text) > 100_000
    windows = retention_windows(smol_tokenizer, text, window=64, count=5)
    assert len(windows) == 5 and all(len(w) == 64 for w in windows)
    assert retention_windows(smol_tokenizer, load_retention_text(None), 64, 5) == windows


def test_retention_text_shorter_than_a_window_is_an_error(inputs, smol_tokenizer):
    with pytest.raises(EvalError, match="fewer than one window"):
        retention_windows(smol_tokenizer, load_retention_text(str(inputs["text"])), window=4096, count=1)


def test_cli_writes_the_json_and_prints_the_summary(inputs, tmp_path, capsys):
    out = tmp_path / "result.json"
    args = [str(inputs["model"]), "--data", str(inputs["data"]), "--num-loss", "2", "--num-accuracy", "1",
            "--max-new-tokens", "4", "--retention-text", str(inputs["text"]), "--window", "16",
            "--num-windows", "2", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    written = json.loads(out.read_text())
    assert written["counts"]["accuracy"]["problems"] == 1 and len(written["records"]) == 1
    printed = json.loads(capsys.readouterr().out)
    assert printed["figures"] == written["figures"] and "records" not in printed


@pytest.mark.parametrize("case, message", [
    ("model", "model directory .* does not exist"),
    ("data", "data file .* does not exist"),
    ("text", "fewer than one window"),
])
def test_cli_errors_exit_2_with_a_message(inputs, tmp_path, capsys, case, message):
    args = {"model": str(inputs["model"]), "--data": str(inputs["data"]),
            "--retention-text": str(inputs["text"]), "--window": "16"}
    if case == "model":
        args["model"] = str(tmp_path / "no-model")
    elif case == "data":
        args["--data"] = str(tmp_path / "no-data.jsonl")
    else:
        args["--window"] = "4096"
    argv = [args.pop("model"), "--no-progress", "--num-loss", "1", "--num-accuracy", "1", "--max-new-tokens", "2"]
    argv += [item for pair in args.items() for item in pair]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lopt-eval: error: ")
    assert re.search(message, err)


def test_installed_entry_point_reports_errors_without_a_traceback(tmp_path):
    script = Path(sys.executable).parent / "lopt-eval"  # the console script `pip install -e .` wrote
    run = subprocess.run([str(script), str(tmp_path / "missing"), "--no-progress"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2
    assert "lopt-eval: error: model directory" in run.stderr and "Traceback" not in run.stderr
