"""The benchmark's outputs: one JSON document with every figure and setting, and its tables for the terminal."""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path

from .config import BenchConfig
from .env import load_average
from .experiment import pipeline_boundaries
from .models import ModelInfo
from .pipeline_pp import SCHEDULE_SPECS, chunk_boundaries, chunk_ranks
from .results import RowSummary, StagePrediction
from .runner import Cluster
from .stage_alone import StageTimes

MIB = 1024 * 1024

ROW_NOTES = {
    "pipeline": "comm = step time not spent computing: the schedule's point-to-point sends and receives and the "
                "waits for them, which it does not let us tell apart; bytes from the activation shapes "
                "(an activation forward and its gradient back per boundary between ranks and micro-batch)",
    "data-parallel": "comm and bytes from DeepSpeed's comms logger: time in collectives, and their payload "
                     "(tensor sizes, not bytes on the wire); not measured on GPUs, where the logger would slow "
                     "the row",
    "lopt-dist": "comm = time blocked receiving activations plus time blocked on the channel's backpressure; "
                 "bytes = activation channel payload (hidden states, mask, positions, labels, headers)",
}


def fairness_note(cfg: BenchConfig, cluster: Cluster, cores: int | None) -> str:
    if cluster.gpu:
        return (f"GPU mode: one GPU per worker; the single-device rows use one GPU. {cluster.gpus} GPU(s) in the "
                "Ray cluster.")
    total = cfg.single_device_threads
    note = (f"CPU mode: each of the {cfg.workers} workers of a multi-worker row uses {cfg.threads_per_worker} "
            f"torch thread(s); the single-device rows use {total} threads, so every row uses the same {total} "
            f"cores' worth of threads. This machine has {cores} cores.")
    if cores is not None and total > cores:
        note += f" {total} threads on {cores} cores: oversubscribed, rows compete for cores."
    return note


def build_report(cfg: BenchConfig, model: ModelInfo, cluster: Cluster, env: dict, rows: list[RowSummary],
                 stages: list[StageTimes], prediction: StagePrediction | None) -> dict:
    env = {**env, "load_average_at_end": load_average(), "ray_cluster": dataclasses.asdict(cluster)}
    return {
        "tool": "lopt-bench",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {**cfg.to_dict(), **_derived(cfg, model, cluster)},
        "model": dataclasses.asdict(model),
        "environment": env,
        "fairness": fairness_note(cfg, cluster, env.get("cpu_cores")),
        "rows": [dataclasses.asdict(r) for r in rows],
        "row_notes": ROW_NOTES,
        "stages_alone": [dataclasses.asdict(s) for s in stages],
        "prediction": dataclasses.asdict(prediction) if prediction is not None else None,
    }


def _derived(cfg: BenchConfig, model: ModelInfo, cluster: Cluster) -> dict:
    return {
        "micro_batch_size": cfg.micro_batch_size,
        "tokens_per_step": cfg.tokens_per_step,
        "single_device_threads": cfg.single_device_threads,
        "dtype": cfg.dtype,
        "mode": "gpu" if cluster.gpu else "cpu",
        "pipeline_boundaries": pipeline_boundaries(cfg, model) if model.num_layers >= cfg.workers else None,
        "schedule_layouts": {
            s: {"boundaries": chunk_boundaries(cfg, model, s), "chunk_ranks": chunk_ranks(s, cfg.workers)}
            for s in cfg.schedules if model.num_layers >= cfg.workers * SCHEDULE_SPECS[s].stages_per_rank
        },
    }


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")


# ------------------------------------------------------------------------------------------- terminal


def format_report(report: dict) -> str:
    rows = report["rows"]
    parts = [_settings_line(report), "", _main_table(rows), "", _worker_table(rows)]
    scored = [r for r in rows if r.get("mfu") is not None]
    if scored:
        parts += ["", f"MFU (model FLOPs per second over {scored[0]['peak_tflops']:g} dense bf16 TFLOP/s per GPU): "
                  + ", ".join(f"{r['name']} {100 * r['mfu']:.1f}%" for r in scored)]
    if report["stages_alone"]:
        parts += ["", _stage_table(report), _prediction_lines(report)]
    trouble = [f"  {r['name']}: {r['status']}: {r['message']}" for r in rows if r["status"] != "ok"]
    if trouble:
        parts += ["", "Rows that did not run:", *trouble]
    env = report["environment"]
    parts += ["", report["fairness"], f"Load average (1/5/15 min) at start {env['load_average_at_start']}, at end "
              f"{env['load_average_at_end']}: other work on the machine makes every timing noisy."]
    return "\n".join(parts)


def _settings_line(report: dict) -> str:
    s, m = report["settings"], report["model"]
    return (f"lopt-bench: {m['name']} ({m['num_layers']} layers, hidden {m['hidden_size']}, "
            f"{m['parameters'] / 1e6:.1f}M params), {s['dtype']}, sequence {s['seq_len']}, global batch "
            f"{s['global_batch']} = {s['micro_batches']} micro-batches x {s['micro_batch_size']}, "
            f"{_tokens(s)}; {s['warmup_steps']} warm-up + {s['steps']} measured steps; "
            f"pipeline cut at layers {s['pipeline_boundaries']}")


def _tokens(s: dict) -> str:
    if s.get("data") is None:
        return f"{s['tokens_per_step']} tokens/step"
    layout = "packed rows" if s.get("packing") else "padded examples"
    return f"data {s['data']} in {layout} of up to {s['seq_len']} tokens, tokens/s of real tokens"


def _main_table(rows: list[dict]) -> str:
    header = ["row", "layout", "tokens/s median [min-max]", "step s", "x lopt-dist", "peak MiB/worker",
              "x mem", "moved MiB/step", "comm s/step", "of bound", "loss@0", "load"]
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append([r["name"], r["layout"], r["status"], "", "", "", "", "", "", "", "", ""])
            continue
        ratio = r["vs_lopt_dist"]
        lines.append([
            r["name"], r["layout"],
            f"{r['tokens_per_s_median']:.1f} [{r['tokens_per_s_min']:.1f}-{r['tokens_per_s_max']:.1f}]",
            f"{r['step_s_median']:.2f}", _ratio(ratio.get("tokens_per_s")), f"{r['peak_mem_max_bytes'] / MIB:.0f}",
            _ratio(ratio.get("peak_mem")), _mib(r["bytes_moved_per_step"]), _num(r["comm_s_per_step"]),
            f"{100 * r['of_predicted']:.0f}%" if r["of_predicted"] is not None else "",
            f"{r['losses'][0]:.4f}" if r["losses"] else "", _load(r["load_average"]),
        ])
    return _table(header, lines)


def _worker_table(rows: list[dict]) -> str:
    header = ["row", "worker", "busy %", "bubble %", "comm s/step", "sent MiB/step", "peak MiB"]
    lines = []
    for r in rows:
        for w in r["worker_stats"]:
            lines.append([r["name"], w["label"], f"{100 * w['busy_frac']:.0f}", f"{100 * w['bubble_frac']:.0f}",
                          _num(w["comm_s_per_step"]), _mib(w["bytes_sent_per_step"]),
                          f"{w['peak_mem_bytes'] / MIB:.0f}"])
    return _table(header, lines)


def _stage_table(report: dict) -> str:
    header = ["stage", "layers", "LoPT fwd+bwd s/ub", "e2e fwd s/ub", "e2e bwd s/ub", "optimizer s",
              "LoPT s/step", "e2e s/step"]
    p = report["prediction"]
    lines = [[str(s["stage"]), f"{s['layers'][0]}-{s['layers'][1] - 1}", f"{s['lopt_s']:.3f}",
              f"{s['e2e_forward_s']:.3f}", f"{s['e2e_backward_s']:.3f}", f"{s['optimizer_s']:.3f}",
              f"{p['lopt_stage_s'][i]:.2f}", f"{p['e2e_stage_s'][i]:.2f}"]
             for i, s in enumerate(report["stages_alone"])]
    return "Each stage alone (one worker's threads; ub = micro-batch):\n" + _table(header, lines)


def _prediction_lines(report: dict) -> str:
    p = report["prediction"]
    return (f"Bubble-free bounds from these times (the slowest stage sets the pace): lopt-dist "
            f"{p['lopt_bound_tokens_per_s']:.1f} tokens/s, end-to-end pipeline over the same cut "
            f"{p['e2e_bound_tokens_per_s']:.1f} tokens/s; all LoPT stages on one worker "
            f"{p['lopt_one_worker_tokens_per_s']:.1f} tokens/s. Stage imbalance (slowest / mean LoPT stage): "
            f"{p['imbalance']:.2f}.")


def _table(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, lines)])


def _ratio(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else ""


def _num(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "n/a"


def _load(loads: list) -> str:
    """The 1-minute load average after the row: above the cores in use, the row shared them with other work."""
    after = loads[1]
    return f"{after[0]:.1f}" if after else ""


def _mib(value: float | None) -> str:
    return f"{value / MIB:.1f}" if value is not None else "n/a"
