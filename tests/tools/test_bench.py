"""lopt-bench: the `--quick` run end to end (real Ray, DeepSpeed, gloo and pipelining schedules), its JSON's
fields and their consistency, never a speed; and the messages for settings that cannot run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tools.bench.config import QUICK, BenchConfig, BenchConfigError
from tools.bench.models import ModelInfo
from tools.bench.plan import plan_rows, schedule_problem
from tests.conftest import REPO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK_ROWS = ["e2e", "lopt", "pp-gpipe", "pp-1f1b", "pp-interleaved-1f1b", "pp-zbv", "zero2", "lopt-dist"]
EVENT_KINDS = {"forward", "backward", "backward_input", "backward_weight", "optimizer", "send", "send_wait",
               "recv_wait"}


def _lopt_bench(args: list[str], cache) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["LOPT_DIST_CACHE"] = str(cache)  # the random model is saved here, not in the user's cache
    return subprocess.run([sys.executable, "-m", "tools.bench", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    done = _lopt_bench(["--quick", "--out", str(out)], out / "cache")
    assert done.returncode == 0, done.stdout + done.stderr
    return out, json.loads((out / "bench.json").read_text()), done.stdout


def test_quick_run_writes_table_json_and_pngs(quick):
    out, report, stdout = quick
    assert [r["name"] for r in report["rows"]] == QUICK_ROWS
    assert all(r["status"] == "ok" for r in report["rows"]), [(r["name"], r["message"]) for r in report["rows"]]
    for name in ("timeline.png", "throughput_memory.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    for name in QUICK_ROWS:
        assert name in stdout
    assert "CPU mode" in stdout and "single-device rows use 2 threads" in report["fairness"]


def test_settings_and_environment_are_recorded(quick):
    _, report, _ = quick
    settings, model, env = report["settings"], report["model"], report["environment"]
    assert settings["quick"] and settings["seq_len"] == QUICK["seq_len"] and settings["workers"] == 2
    assert settings["micro_batch_size"] * settings["micro_batches"] == settings["global_batch"]
    assert settings["tokens_per_step"] == settings["global_batch"] * settings["seq_len"]
    assert settings["dtype"] == "float32" and settings["mode"] == "cpu"
    assert settings["schedule_layouts"]["zbv"]["chunk_ranks"] == [0, 1, 1, 0]
    assert model["num_layers"] == 4 and model["parameters"] > 0
    assert all(env["versions"][p] for p in ("torch", "ray", "deepspeed", "transformers"))
    assert env["cpu"] and env["cpu_cores"] >= 1 and len(env["load_average_at_end"]) == 3


def test_throughput_figures_are_positive_and_consistent(quick):
    _, report, _ = quick
    settings = report["settings"]
    for row in report["rows"]:
        assert len(row["step_s"]) == settings["steps"] == len(row["tokens_per_s"])
        for step_s, tokens_per_s in zip(row["step_s"], row["tokens_per_s"]):
            assert step_s > 0 and tokens_per_s * step_s == pytest.approx(settings["tokens_per_step"])
        assert 0 < row["tokens_per_s_min"] <= row["tokens_per_s_median"] <= row["tokens_per_s_max"]
        assert len(row["worker_stats"]) == (1 if row["kind"] == "single-device" else settings["workers"])
        for worker in row["worker_stats"]:
            assert 0 < worker["busy_frac"] <= 1 + 1e-9
            assert worker["busy_frac"] + worker["bubble_frac"] == pytest.approx(1.0)
            assert worker["peak_mem_bytes"] >= worker["mem_at_start_bytes"] > 0
        assert row["peak_mem_max_bytes"] == max(w["peak_mem_bytes"] for w in row["worker_stats"])


def test_every_row_trains_the_same_model_on_the_same_samples(quick):
    """Same initial weights and samples: the first step's task loss agrees in every row, LoPT or end to end."""
    _, report, _ = quick
    first = [row["losses"][0] for row in report["rows"]]
    assert all(loss == pytest.approx(first[0], rel=1e-4) for loss in first), first


def test_ratios_are_to_the_lopt_dist_row(quick):
    _, report, _ = quick
    rows = {r["name"]: r for r in report["rows"]}
    reference = rows["lopt-dist"]
    assert reference["vs_lopt_dist"]["tokens_per_s"] == pytest.approx(1.0)
    for row in rows.values():
        ratio = row["tokens_per_s_median"] / reference["tokens_per_s_median"]
        assert row["vs_lopt_dist"]["tokens_per_s"] == pytest.approx(ratio)
        assert row["vs_lopt_dist"]["peak_mem"] > 0


def test_bytes_moved_match_the_shapes(quick):
    _, report, _ = quick
    s, hidden = report["settings"], report["model"]["hidden_size"]
    activation = s["micro_batch_size"] * s["seq_len"] * hidden * 4  # float32
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["e2e"]["bytes_moved_per_step"] == 0 and rows["lopt"]["bytes_moved_per_step"] == 0
    # GPipe/1F1B on two ranks: one boundary; each micro-batch's activation goes forward and its gradient back.
    assert rows["pp-gpipe"]["bytes_moved_per_step"] == 2 * s["micro_batches"] * activation
    # lopt-dist: the hidden states and a little more (mask, positions, labels, headers) forward only.
    moved = rows["lopt-dist"]["bytes_moved_per_step"]
    assert s["micro_batches"] * activation < moved < 2 * s["micro_batches"] * activation
    assert rows["zero2"]["bytes_moved_per_step"] > 0 and rows["zero2"]["comm_s_per_step"] > 0


def test_stage_times_and_bounds(quick):
    _, report, _ = quick
    stages, prediction = report["stages_alone"], report["prediction"]
    assert [s["stage"] for s in stages] == [0, 1]
    assert all(s[k] > 0 for s in stages for k in ("lopt_s", "e2e_forward_s", "e2e_backward_s", "optimizer_s"))
    tokens = report["settings"]["tokens_per_step"]
    assert prediction["lopt_bound_tokens_per_s"] == pytest.approx(tokens / max(prediction["lopt_stage_s"]))
    assert prediction["lopt_one_worker_tokens_per_s"] < prediction["lopt_bound_tokens_per_s"]
    row = next(r for r in report["rows"] if r["name"] == "lopt-dist")
    assert row["of_predicted"] == pytest.approx(row["tokens_per_s_median"] / prediction["lopt_bound_tokens_per_s"])


def test_pipeline_timelines_hold_one_step_of_events(quick):
    _, report, _ = quick
    for row in report["rows"]:
        events = [e for w in row["worker_stats"] for e in w["events"]]
        if row["kind"] not in ("pipeline", "lopt-dist"):
            continue
        assert events and {e["kind"] for e in events} <= EVENT_KINDS
        assert all(0 <= e["start"] <= e["end"] for e in events)
        forwards = [e for w in row["worker_stats"][:1] for e in w["events"] if e["kind"] == "forward"]
        chunks = 2 if row["name"] in ("pp-interleaved-1f1b", "pp-zbv") else 1
        assert len(forwards) == chunks * report["settings"]["micro_batches"]  # rank 0, one step
    zbv = next(r for r in report["rows"] if r["name"] == "pp-zbv")
    assert any(e["kind"] == "backward_weight" for w in zbv["worker_stats"] for e in w["events"])


def test_settings_that_cannot_run_get_a_message_not_a_traceback(tmp_path):
    done = _lopt_bench(["--quick", "--micro-batches", "3", "--out", str(tmp_path)], tmp_path / "cache")
    assert done.returncode == 2
    assert "lopt-bench: error: --micro-batches: 3 micro-batches do not divide the global batch of 8" in done.stderr
    assert "Traceback" not in done.stderr


_MODEL = ModelInfo(name="m", path="m", family="llama", num_layers=4, hidden_size=64, vocab_size=512,
                   parameters=1, tied_embeddings=False)


def test_multi_worker_rows_need_one_gpu_per_worker():
    rows = {r.name: r for r in plan_rows(BenchConfig(**QUICK), _MODEL, gpu=True, gpus=1)}
    assert rows["e2e"].skip_reason is None and rows["lopt"].skip_reason is None
    assert rows["stage-alone"].skip_reason is None
    for name in ("pp-gpipe", "pp-1f1b", "zero2", "lopt-dist"):
        assert rows[name].skip_reason == "needs 2 GPUs, one per worker, and this machine has 1"


def test_sizes_a_row_cannot_take_skip_that_row_only():
    cfg = BenchConfig(**{**QUICK, "workers": 3, "global_batch": 4, "micro_batches": 2})
    rows = {r.name: r for r in plan_rows(cfg, _MODEL, gpu=False, gpus=0)}
    assert "do not split evenly over 3 workers" in rows["zero2"].skip_reason
    assert "at least as many micro-batches as stages (3)" in rows["pp-1f1b"].skip_reason
    assert "4 layers, too few for 6 stages" in rows["pp-zbv"].skip_reason
    assert rows["pp-gpipe"].skip_reason is None and rows["lopt-dist"].skip_reason is None
    assert schedule_problem("interleaved-1f1b", 5, 2, 4) is not None


def test_static_settings_are_checked_once():
    with pytest.raises(BenchConfigError, match="--workers: must be >= 2"):
        BenchConfig(**{**QUICK, "workers": 1})
    with pytest.raises(BenchConfigError, match="--rows"):
        BenchConfig(**{**QUICK, "rows": ["e2e", "fsdp"]})


def test_data_and_packing_options_are_checked_once():
    with pytest.raises(BenchConfigError, match="--packing: packs the examples of --data"):
        BenchConfig(**{**QUICK, "packing": True})
    with pytest.raises(BenchConfigError, match="--data: the .*'pp'.* rows train on fixed-length samples only"):
        BenchConfig(model="smollm2-135m", data="builtin:arithmetic", rows=["lopt-dist", "pp"])
    with pytest.raises(BenchConfigError, match="--data: tokenizes with the model's own tokenizer"):
        BenchConfig(**{**QUICK, "data": "builtin:arithmetic", "rows": ["lopt-dist"]})
    BenchConfig(model="smollm2-135m", data="builtin:arithmetic", packing=True, rows=["e2e", "lopt", "lopt-dist"])


def test_data_rows_count_real_tokens(smol_tokenizer):
    """--data: each row's batches are lopt-train's own (padded, or packed), and tokens/s counts their real tokens."""
    from tools.bench.data import bench_batches
    from tools.bench.models import prepare_model

    cfg = BenchConfig(model="smollm2-135m", data="builtin:arithmetic", seq_len=256, rows=["lopt-dist"])
    model = prepare_model(cfg)
    padded = bench_batches(cfg, model, 2)
    packed = bench_batches(BenchConfig(**{**cfg.to_dict(), "packing": True}), model, 2)
    assert int(padded.get(0)["attention_mask"].sum()) == padded.tokens(0)
    assert "position_ids" in packed.get(0) and packed.tokens(0) > padded.tokens(0)  # rows of several examples
