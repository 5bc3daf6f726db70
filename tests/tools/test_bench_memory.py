"""lopt-bench-memory on a tiny bf16 Llama: every worker's figures are there and consistent, a ZeRO-3 worker owns
half its stage, and the 70B projection is built from the measured ratios. Never a size or a speed."""

from __future__ import annotations

import json

import pytest
import ray

from lopt_dist.model.loading import CACHE_ENV
from tools.bench.memory.cli import JSON_NAME, MARKDOWN_NAME, benchmark, main
from tools.bench.memory.report import model_parameter_bytes, stage_parameter_bytes
from tools.bench.memory.run import Layout, Settings


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(out / "cache"))  # the random model is saved here, not in the user's cache
        ray.init(address="local", num_cpus=3, include_dashboard=False)
        try:
            report = benchmark(Settings(size="tiny", layouts=(Layout.parse("1+2:zero3"),), steps=1,
                                        seq_len=16, out_dir=str(out)), "test")
        finally:
            ray.shutdown()
    return out, report


def test_every_worker_reports_consistent_figures(measured):
    out, report = measured
    assert json.loads((out / JSON_NAME).read_text())["layouts"] == report["layouts"]
    [layout] = report["layouts"]
    assert [(w["stage"], w["rank"]) for w in layout["workers"]] == [(0, 0), (1, 0), (1, 1)]
    for w in layout["workers"]:
        assert 0 < w["rss_before_setup"] <= w["load_peak_rss"] <= w["setup_peak_rss"]
        assert w["rss_after_engine"] <= w["setup_peak_rss"] and w["step_peak"] > 0
        assert w["setup_ratio"] == pytest.approx((w["setup_peak_rss"] - w["rss_before_setup"]) / w["owned_param_bytes"])
    export = layout["export"]
    assert export["driver_peak_rss"] >= export["driver_rss_before"] > 0
    assert export["model_bytes"] == model_parameter_bytes("tiny") == report["model"]["bytes"]


def test_zero3_workers_own_half_their_stage(measured):
    _, report = measured
    [layout] = report["layouts"]
    stage_bytes = stage_parameter_bytes("tiny", 2)
    alone, *pair = layout["workers"]
    assert alone["owned_param_bytes"] == alone["stage_param_bytes"] == stage_bytes[0]
    for w in pair:
        assert w["stage_param_bytes"] == stage_bytes[1]
        assert stage_bytes[1] / 2 <= w["owned_param_bytes"] <= stage_bytes[1] / 2 + 64  # rounding per parameter


def test_projection_scales_the_measured_ratios(measured):
    out, report = measured
    [projected] = report["projection"]["layouts"]
    big = stage_parameter_bytes("70b", 2)
    assert [r["owned_param_bytes"] for r in projected["workers"]] == [big[0], big[1] // 2]
    worker = report["layouts"][0]["workers"][0]
    assert projected["workers"][0]["setup"] == pytest.approx(
        worker["rss_before_setup"] + worker["setup_ratio"] * big[0])
    text = (out / MARKDOWN_NAME).read_text()
    assert "**1+2 zero3** (measured" in text and "projected" in text and "Command: `test`" in text


def test_a_bad_layout_is_one_line(capsys):
    assert main(["--layouts", "2+2:zero9"]) == 2
    assert "lopt-bench-memory: error: layout '2+2:zero9': expected" in capsys.readouterr().err
