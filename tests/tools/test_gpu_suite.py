"""The GPU suite's CPU-side parts: its plan, the figures and checks it reads from each step's outputs, its
report, MFU arithmetic and the GPU peak table. (`--smoke` runs the whole suite on the CPU; it takes minutes.)"""

from __future__ import annotations

import json
import shlex

import pytest

from tools.bench.flops import matmul_parameters, mfu, peak_bf16_tflops, training_flops_per_token
from tools.gpu_suite.cli import _merge_earlier, main
from tools.gpu_suite.report import markdown
from tools.gpu_suite.results import read_step
from tools.gpu_suite.steps import Step


def test_peak_table_tells_gpu_variants_apart():
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4  # SXM
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.5
    assert peak_bf16_tflops("NVIDIA H100 NVL") == 835.5
    assert peak_bf16_tflops("NVIDIA H200") == 989.4
    assert peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == peak_bf16_tflops("NVIDIA A100 80GB PCIe") == 312.0
    assert peak_bf16_tflops("NVIDIA L40S") == 362.1 and peak_bf16_tflops("NVIDIA L4") == 121.0
    assert peak_bf16_tflops("NVIDIA A10") == 125.0 and peak_bf16_tflops("Tesla T4") is None  # no bf16 tensor cores


def test_mfu_from_model_flops():
    # SmolLM2-135M: 134.5M parameters, tied embeddings (49152 x 576), 30 layers.
    params = matmul_parameters(134_515_008, 49152, 576, tied_embeddings=True)
    assert params == 134_515_008
    assert matmul_parameters(1000, 10, 20, tied_embeddings=False) == 800  # the input embedding is a lookup
    per_token = training_flops_per_token(params, 30, 576, 512)
    assert per_token == 6 * 134_515_008 + 12 * 30 * 576 * 512
    # 100k tokens/s of that on one GPU of 989.4 TFLOP/s, and on two.
    assert mfu(100_000, per_token, 989.4) == pytest.approx(100_000 * per_token / 989.4e12)
    assert mfu(100_000, per_token, 989.4, gpus=2) == pytest.approx(mfu(100_000, per_token, 989.4) / 2)


def test_dry_run_plans_every_row_with_its_command(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--dry-run"]) == 0
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == ["gpu-tests", "local-lopt-bf16", "local-e2e-bf16", "pipeline-shared-gpu", "pipeline-nccl",
                           "bench-smollm2-135m", "bench-llama-1b"]
    assert report["verdict"] == "planned" and steps["pipeline-nccl"]["status"] == "skipped"  # no second GPU here
    shared = shlex.split(steps["pipeline-shared-gpu"]["command"])
    assert {"runtime.gpus_per_worker=0.5", "runtime.device=cuda", "train.dtype=bfloat16", "runtime.mode=ray"} <= set(shared)
    bench = shlex.split(steps["bench-llama-1b"]["command"])
    assert bench[bench.index("--device") + 1] == "cuda" and bench[bench.index("--dtype") + 1] == "bfloat16"
    assert "--model-set=hidden_size=2048" in bench and bench[bench.index("--rows") + 1] == "e2e,lopt"
    assert "-m gpu" in steps["gpu-tests"]["command"]
    assert "| pipeline-nccl | skipped (needs two GPUs)" in (tmp_path / "gpu_suite.md").read_text()


def test_gpu_mode_without_a_gpu_says_what_to_do(tmp_path, capsys):
    assert main(["--out", str(tmp_path)]) == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--dry-run", "--only", "gpu-tests,nope"]) == 2


def _metrics(directory, losses, **extra):
    directory.mkdir(parents=True)
    lines = [json.dumps({"step": i, "task_loss": x, "tokens_per_s": 100.0 + i, "step_seconds": 0.5,
                         "s0w0_peak_mem_bytes": 1 << 20, "s1w0_peak_mem_bytes": (2 + i) << 20,
                         "s0w0_busy_frac": 0.5, **extra}) for i, x in enumerate(losses)]
    (directory / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_training_runs_pass_when_losses_are_finite_and_fall(tmp_path):
    step = Step("run", "train-pipeline", out="run")
    _metrics(tmp_path / "run", [3.0, 2.8, 2.5, 2.4, 2.0, 1.9, 1.8, 1.7])
    figures, checks = read_step(step, tmp_path)
    assert checks == {"losses finite": True, "loss falling": True}
    assert figures["tokens_per_s_median"] == pytest.approx(104.5)  # the first two steps are warm-up
    assert figures["peak_mem_bytes"] == {"s0w0": 1 << 20, "s1w0": 9 << 20}
    assert figures["busy_frac_median"] == {"s0w0": 0.5}
    _metrics(tmp_path / "bad", [3.0, float("nan"), 3.5, 3.6])
    assert read_step(Step("bad", "train-local", out="bad"), tmp_path)[1] == {"losses finite": False,
                                                                              "loss falling": False}
    assert read_step(Step("none", "train-local", out="none"), tmp_path)[1] == {"outputs readable": False}


def test_test_step_reads_junit_and_the_report_names_failures(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "junit.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase name="a"/><testcase name="b"><failure message="x"/></testcase>'
        '<testcase name="c"><skipped/></testcase></testsuite></testsuites>')
    figures, checks = read_step(Step("gpu-tests", "tests", out="t"), tmp_path)
    assert figures["passed"] == 1 and figures["failed"] == ["b"] and checks["no test failed"] is False
    report = {"verdict": "failed", "command": "python -m tools.gpu_suite --out x", "created": "now",
              "environment": {"gpus": ["NVIDIA H100 80GB HBM3"], "torch": "2.11", "cuda": "13.0", "cpu_cores": 16},
              "steps": [{"name": "gpu-tests", "kind": "tests", "describes": "tests", "status": "failed",
                         "seconds": 3.0, "checks": checks, "figures": figures, "log_tail": "AssertionError in b"}]}
    text = markdown(report)
    assert "# GPU check suite: failed" in text and "NVIDIA H100 80GB HBM3" in text
    assert "no test failed: FAILED" in text and "## gpu-tests failed" in text and "AssertionError in b" in text


def test_a_suite_run_in_parts_keeps_one_report(tmp_path):
    # Two parts (e.g. two device calls): the second run's report keeps the first run's steps.
    (tmp_path / "gpu_suite.json").write_text(json.dumps({"steps": [
        {"name": "gpu-tests", "kind": "tests", "describes": "", "status": "passed", "seconds": 60.0},
        {"name": "bench-llama-1b", "kind": "bench", "describes": "", "status": "failed", "seconds": 5.0}]}))
    merged = _merge_earlier(tmp_path, [{"name": "bench-llama-1b", "status": "passed"},
                                       {"name": "local-e2e-bf16", "status": "passed"}])
    assert [(r["name"], r["status"]) for r in merged] == [("gpu-tests", "passed"), ("bench-llama-1b", "passed"),
                                                          ("local-e2e-bf16", "passed")]
