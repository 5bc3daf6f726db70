"""`lopt-bench`: parse -> prepare the model -> run every row -> report (table, JSON, PNGs) -> close.

Settings that no row can run with are reported once, as `lopt-bench: error: ...`, without a traceback; a row
that cannot run here is skipped with its reason and the others still run.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

import yaml

from lopt_dist.config import ConfigError

from .config import QUICK, ROWS, SCHEDULES, BenchConfig, BenchConfigError

JSON_NAME, TIMELINE_NAME, BARS_NAME = "bench.json", "timeline.png", "throughput_memory.png"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lopt-bench",
        description="Compare lopt-dist with single-device training, PyTorch pipeline schedules and DeepSpeed "
                    "ZeRO-2 data parallelism on the same model, batch and samples.")
    p.add_argument("--quick", action="store_true",
                   help="a tiny random Llama and two measured steps (about two minutes on two cores); "
                        "options given as well override the preset")
    p.add_argument("--model", help="alias (smollm2-135m), checkpoint directory, hub id, or random:<family> "
                                    "for a seeded random model (default smollm2-135m)")
    p.add_argument("--model-set", action="append", default=[], metavar="KEY=VALUE",
                   help="random models: a config value, e.g. --model-set hidden_size=1024 (repeatable)")
    p.add_argument("--seq-len", type=int, help="tokens per sample (default 128)")
    p.add_argument("--global-batch", type=int, help="samples per optimizer step (default 8)")
    p.add_argument("--micro-batches", type=int, help="micro-batches per step; must divide the batch (default 8)")
    p.add_argument("--workers", type=int, help="workers of the multi-worker rows = pipeline stages (default 2)")
    p.add_argument("--threads-per-worker", type=int, help="CPU threads per worker (default 1)")
    p.add_argument("--warmup-steps", type=int, help="unmeasured steps first (default 1)")
    p.add_argument("--steps", type=int, help="measured steps (default 3)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto: GPUs when Ray has them")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="bfloat16: mixed precision as train.dtype (rows e2e, lopt, lopt-dist; default float32)")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak for MFU, when its name is not in "
                                                     "tools/bench/flops.py's table")
    p.add_argument("--rows", help=f"comma-separated subset of {','.join(ROWS)} (default all)")
    p.add_argument("--schedules", help=f"pipeline schedules, from {','.join(SCHEDULES)} "
                                       "(default gpipe,1f1b,interleaved-1f1b,zbv)")
    p.add_argument("--boundaries", help="comma-separated layers where stages 2.. start (default: even cut)")
    p.add_argument("--channel-depth", type=int, help="lopt-dist: micro-batches in flight per boundary (default 4)")
    p.add_argument("--zero2-config", help="DeepSpeed ZeRO-2 JSON of the data-parallel row "
                                          "(default configs/deepspeed/zero2.json)")
    p.add_argument("--lopt-dist-deepspeed-config", help="DeepSpeed JSON of the lopt-dist stage groups "
                                                        "(default configs/deepspeed/zero0.json, as lopt-train's "
                                                        "one-worker groups)")
    p.add_argument("--data", help="rows e2e, lopt, lopt-dist train on this lopt-dist data.source (e.g. "
                                  "builtin:arithmetic or a .jsonl file) instead of fixed-length random samples; "
                                  "tokens/s counts real tokens")
    p.add_argument("--packing", action="store_true", default=None,
                   help="with --data: pack several examples per row of --seq-len tokens (data.packing)")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", dest="out_dir", help="output directory (default bench-out)")
    p.add_argument("--verbose", action="store_true", help="show the workers' own logs")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    values = dict(QUICK, quick=True) if args.quick else {}
    if args.model is not None:
        values.pop("model_overrides", None)  # the preset's sizes belong to the preset's model
    given = {k: v for k, v in vars(args).items()
             if v is not None and k not in ("quick", "verbose", "model_set", "rows", "schedules", "boundaries",
                                            "peak_tflops")}
    values.update(given)
    if args.model_set:
        values["model_overrides"] = {**values.get("model_overrides", {}), **_key_values(args.model_set)}
    for name in ("rows", "schedules"):
        if getattr(args, name) is not None:
            values[name] = [x.strip() for x in getattr(args, name).split(",") if x.strip()]
    if args.boundaries is not None:
        values["boundaries"] = _integers(args.boundaries, "--boundaries")
    return BenchConfig(**values)


def _key_values(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise BenchConfigError(f"--model-set {item!r}: expected KEY=VALUE, e.g. hidden_size=1024")
        out[key.strip()] = yaml.safe_load(raw)
    return out


def _integers(text: str, option: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchConfigError(f"{option}: expected comma-separated integers, got {text!r}") from None


def benchmark(cfg: BenchConfig, verbose: bool, peak_tflops: float | None = None) -> tuple[dict, list[Path]]:
    """Run every row and write the outputs; returns the report and the files written."""
    import ray

    from lopt_dist.model.stages import resolve_boundaries
    from . import plots
    from .env import environment
    from .models import prepare_model
    from .report import build_report, write_json
    from .flops import peak_bf16_tflops
    from .results import compare, fill_mfu, predict, summarize_row
    from .runner import connect, run_all

    env = environment()
    model = prepare_model(cfg)
    if cfg.boundaries is not None:
        try:
            resolve_boundaries(cfg.boundaries, model.num_layers)
        except ConfigError as err:
            raise BenchConfigError(f"--boundaries: {str(err).partition(': ')[2]}") from None
    cluster = connect(cfg, verbose)
    try:
        runs = run_all(cfg, model, cluster, _progress)
    finally:
        if cluster.started_here:
            ray.shutdown()
    rows = [summarize_row(run, cfg) for run in runs if run.row.kind != "stage-alone"]
    stages = next((run.stage_times for run in runs if run.row.kind == "stage-alone" and run.status == "ok"), [])
    prediction = predict(stages, cfg) if stages else None
    compare(rows, prediction)
    if cluster.gpu and env["gpus"]:
        fill_mfu(rows, cfg, model, peak_tflops or peak_bf16_tflops(env["gpus"][0]))
    report = build_report(cfg, model, cluster, env, rows, stages, prediction)
    out = Path(cfg.out_dir)
    write_json(report, out / JSON_NAME)
    written = [out / JSON_NAME]
    written += [p for p in (plots.plot_timelines(report, out / TIMELINE_NAME),
                            plots.plot_bars(report, out / BARS_NAME)) if p is not None]
    return report, written


def _progress(message: str) -> None:
    print(f"[lopt-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
        _progress(f"settings: {dataclasses.asdict(cfg)}")
        report, written = benchmark(cfg, args.verbose, args.peak_tflops)
    except ConfigError as err:  # BenchConfigError included
        print(f"lopt-bench: error: {err}", file=sys.stderr)
        return 2
    from .report import format_report

    print(format_report(report))
    print("\nwrote " + ", ".join(str(p) for p in written))
    failed = [r["name"] for r in report["rows"] if r["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
