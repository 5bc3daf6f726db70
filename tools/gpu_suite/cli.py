"""`python -m tools.gpu_suite --out DIR`: run every step, then write the report; exit 1 if any step failed.

    python -m tools.gpu_suite --out gpu-report            # on a GPU machine: tests, training runs, bench rows
    python -m tools.gpu_suite --out gpu-report --only gpu-tests,bench-llama-1b   # a part; the report keeps the rest
    python -m tools.gpu_suite --out gpu-report --dry-run  # the plan, as commands; runs nothing
    python -m tools.gpu_suite --out smoke --smoke         # the same steps on the CPU, tiny model: plumbing only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from .report import write_reports
from .results import read_step
from .steps import Step, plan

REPO = Path(__file__).resolve().parents[2]
LOG_TAIL = 4000


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.gpu_suite", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for the report and every step's outputs")
    p.add_argument("--only", help="comma-separated step names (default: all)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps of the training runs (default 30)")
    p.add_argument("--dry-run", action="store_true", help="write the plan and the commands; run nothing")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny random model, few steps: checks the suite itself")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out = Path(args.out).resolve()
    env = environment()
    if not (args.smoke or args.dry_run) and not env["gpus"]:
        print("gpu_suite: error: torch sees no CUDA device; run it on a GPU machine, or use --smoke (CPU) or "
              "--dry-run", file=sys.stderr)
        return 2
    model = _smoke_model(out) if args.smoke and not args.dry_run else "smollm2-135m"
    steps = plan(out, len(env["gpus"]), args.smoke, 4 if args.smoke else args.steps, model)
    if args.only:
        wanted = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = sorted(set(wanted) - {s.name for s in steps})
        if unknown:
            print(f"gpu_suite: error: --only: unknown steps {unknown}; choose from {[s.name for s in steps]}",
                  file=sys.stderr)
            return 2
        steps = [s for s in steps if s.name in wanted]
    started = time.perf_counter()
    results = [run_step(step, out, args.dry_run) for step in steps]
    if args.only and not args.dry_run:
        results = _merge_earlier(out, results)
    verdict = ("planned" if args.dry_run else "failed" if any(r["status"] == "failed" for r in results)
               else "passed")
    report = {"tool": "gpu_suite", "verdict": verdict, "mode": "smoke" if args.smoke else "gpu",
              "command": shlex.join([sys.executable, "-m", "tools.gpu_suite", *(argv or sys.argv[1:])]),
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "seconds": time.perf_counter() - started, "environment": env, "steps": results}
    for path in write_reports(report, out):
        print(f"gpu_suite: wrote {path}")
    print(f"gpu_suite: {verdict}: " + ", ".join(f"{r['name']} {r['status']}" for r in results))
    return 1 if verdict == "failed" else 0


def _merge_earlier(out: Path, results: list[dict]) -> list[dict]:
    """With --only, the steps an earlier run of the same --out recorded stay in the report (a suite may be run
    in parts, e.g. one device call each); steps run now replace their earlier entries."""
    try:
        earlier = json.loads((out / "gpu_suite.json").read_text())["steps"]
    except (OSError, ValueError, KeyError):
        return results
    now = {r["name"]: r for r in results}
    merged = [now.pop(r["name"], r) for r in earlier if r["status"] != "planned"]
    return merged + list(now.values())


def run_step(step: Step, out: Path, dry_run: bool) -> dict:
    result = {"name": step.name, "kind": step.kind, "describes": step.describes, "command": shlex.join(step.argv)}
    if step.skip_reason:
        return {**result, "status": "skipped", "reason": step.skip_reason}
    if dry_run:
        return {**result, "status": "planned"}
    directory = out / step.out
    directory.mkdir(parents=True, exist_ok=True)
    print(f"gpu_suite: {step.name}: {result['command']}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    with open(directory / "log.txt", "w") as log:
        try:
            done = subprocess.run(step.argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=step.timeout_s)
            code = done.returncode
        except subprocess.TimeoutExpired:
            code = None
    seconds = time.perf_counter() - start
    figures, checks = read_step(step, out)
    tail = (directory / "log.txt").read_text(errors="replace")[-LOG_TAIL:]
    passed = code == 0 and all(checks.values())
    reason = None if code == 0 else f"timed out after {step.timeout_s:g} s" if code is None else f"exit code {code}"
    print(f"gpu_suite: {step.name}: {'passed' if passed else 'failed'} in {seconds:.0f} s", file=sys.stderr)
    return {**result, "status": "passed" if passed else "failed", "reason": reason, "seconds": seconds,
            "figures": figures, "checks": checks, "log_tail": "" if passed else tail}


def environment() -> dict:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"gpus": gpus, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_cores": os.cpu_count()}


def _smoke_model(out: Path) -> str:
    """A tiny random Llama with the embedded SmolLM2 tokenizer, saved once under the output directory."""
    from lopt_dist.model.loading import load_tokenizer
    from lopt_dist.model.tiny import save_tiny_model

    target = out / "tiny-llama"
    if not (target / "config.json").is_file():
        target.mkdir(parents=True, exist_ok=True)
        save_tiny_model("llama", target, load_tokenizer("smollm2-135m"))
    return str(target)
