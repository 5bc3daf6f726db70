"""`lopt-bench-memory`: parse -> save the random bf16 model -> run each layout -> ratios, 70B projection -> write.

    python -m tools.bench.memory --size 1b                      # 1+1 ZeRO-0 and 2+2 ZeRO-3, ~1B parameters
    python -m tools.bench.memory --size 125m --layouts 1+1:zero0,2+2:zero3 --steps 2 --out bench-memory
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from .run import SIZES, Layout, Settings, random_bf16_model, run_layout

JSON_NAME, MARKDOWN_NAME = "memory.json", "memory.md"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lopt-bench-memory", description=__doc__.splitlines()[0])
    sizes = [s for s in SIZES if s != "70b"]
    p.add_argument("--size", choices=sizes, default="1b", help="random Llama to measure (default 1b: 0.95B parameters)")
    p.add_argument("--layouts", default="1+1:zero0,2+2:zero3",
                   help="comma-separated WORKERS+WORKERS:zeroN layouts (default 1+1:zero0,2+2:zero3)")
    p.add_argument("--steps", type=int, default=2, help="training steps per layout (default 2)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--threads-per-worker", type=int, default=1)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", dest="out_dir", default="bench-memory")
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    layouts = tuple(Layout.parse(text.strip()) for text in args.layouts.split(",") if text.strip())
    if args.steps < 1:
        raise ValueError("--steps: must be >= 1")
    return Settings(size=args.size, layouts=layouts, steps=args.steps, seq_len=args.seq_len,
                    micro_batch_size=args.micro_batch_size, threads_per_worker=args.threads_per_worker,
                    device=args.device, seed=args.seed, out_dir=args.out_dir)


def benchmark(settings: Settings, command: str) -> dict:
    import ray

    from .report import add_ratios, markdown, model_parameter_bytes, project

    model_dir = random_bf16_model(settings.size, settings.seed)
    model_bytes = model_parameter_bytes(settings.size)
    started = not ray.is_initialized()
    if started:
        # "local": a new instance of our own, never a cluster someone else started on this machine.
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, _cpus_needed(settings)),
                 include_dashboard=False, log_to_driver=False)
    try:
        layouts = []
        for layout in settings.layouts:
            _progress(f"{layout.name}: starting")
            result = run_layout(settings, layout, model_dir, _progress)
            add_ratios(result, model_bytes)
            layouts.append(result)
    finally:
        if started:
            ray.shutdown()
    report = {"settings": {**dataclasses.asdict(settings), "layouts": [l.name for l in settings.layouts]},
              "model": {"path": str(model_dir), "parameters": model_bytes // 2, "bytes": model_bytes},
              "machine": _machine(), "command": command, "layouts": layouts}
    report["projection"] = project(layouts)
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / JSON_NAME).write_text(json.dumps(report, indent=2))
    (out / MARKDOWN_NAME).write_text(markdown(report))
    return report


def _cpus_needed(settings: Settings) -> int:
    return max(sum(l.workers) for l in settings.layouts) * settings.threads_per_worker


def _machine() -> str:
    from ..env import environment

    env = environment()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{env['cpu']} ({env['cpu_cores']} cores, {memory:.0f} GiB), {platform.system()}, torch "
            f"{env['versions']['torch']}, deepspeed {env['versions']['deepspeed']}, load average "
            f"{env['load_average_at_start']}")


def _progress(message: str) -> None:
    print(f"[lopt-bench-memory {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as err:
        print(f"lopt-bench-memory: error: {err}", file=sys.stderr)
        return 2
    command = "python -m tools.bench.memory " + shlex.join(sys.argv[1:] if argv is None else argv)
    from .report import markdown

    report = benchmark(settings, command)
    print(markdown(report))
    print(f"wrote {Path(settings.out_dir) / JSON_NAME}, {Path(settings.out_dir) / MARKDOWN_NAME}")
    return 0
