"""lopt-plot draws PNGs from metrics files as the trainers write them, and explains unusable inputs."""

import math

import pytest

from lopt_dist.telemetry.metrics import MetricsLog
from tools.plot_metrics import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_metrics(path, steps=6, workers=(), stages=2):
    """A metrics.jsonl like a run's: losses and throughput, plus per-worker keys for each `s<i>w<j>` given."""
    log = MetricsLog(path)
    for step in range(steps):
        record = {"step": step, "task_loss": 3.0 * math.exp(-step / 4), "tokens": 512, "step_seconds": 0.5,
                  "tokens_per_s": 1024.0 + 10 * step}
        record.update({f"recon_loss_{i}": 0.2 / (step + 1 + i) for i in range(stages - 1)})
        for w, key in enumerate(workers):
            record.update({f"{key}_busy_frac": 0.6 - 0.1 * w, f"{key}_recv_wait_s": 0.05 * w,
                           f"{key}_send_wait_s": 0.1 - 0.02 * w, f"{key}_bytes_sent": 4096, f"{key}_max_depth": 2,
                           f"{key}_peak_mem_bytes": 1 << 20})
        if workers:
            record["channel_depth"] = 2
        log.write(record)
    log.close()
    return path


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_single_run_without_workers(tmp_path):
    metrics = _write_metrics(tmp_path / "run" / "metrics.jsonl", stages=1)
    assert main([str(metrics)]) == 0
    _assert_png(tmp_path / "run" / "metrics.png")  # the default: beside the metrics


def test_pipeline_run_with_workers_and_two_reconstruction_losses(tmp_path):
    workers = ("s0w0", "s0w1", "s1w0", "s2w0")
    metrics = _write_metrics(tmp_path / "metrics.jsonl", workers=workers, stages=3)
    out = tmp_path / "plots" / "pipeline.png"
    assert main([str(metrics), "--out", str(out)]) == 0
    _assert_png(out)


def test_comparing_runs(tmp_path):
    e2e = _write_metrics(tmp_path / "e2e" / "metrics.jsonl", stages=1)
    lopt = _write_metrics(tmp_path / "lopt" / "metrics.jsonl", steps=4, workers=("s0w0", "s1w0"))
    out = tmp_path / "curves.png"
    assert main([str(e2e), str(lopt), "--labels", "e2e", "lopt", "--out", str(out)]) == 0
    _assert_png(out)


def test_missing_file_exits_2_with_a_message(tmp_path, capsys):
    assert main([str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x.png")]) == 2
    assert "lopt-plot: error: metrics file" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_file_without_steps_exits_2(tmp_path, capsys):
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"loss": 1.0}\n')
    assert main([str(bad)]) == 2
    assert "no steps" in capsys.readouterr().err


def test_labels_must_match_the_files(tmp_path):
    metrics = _write_metrics(tmp_path / "metrics.jsonl")
    with pytest.raises(SystemExit) as exit_:
        main([str(metrics), "--labels", "a", "b"])
    assert exit_.value.code == 2
