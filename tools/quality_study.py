"""The quality study: does LoPT learn the task and keep what the model knew, compared with end-to-end SFT?

Trains the same base model on the same samples, in the same order, for the same number of steps twice —
`e2e` in one process and `lopt` on the distributed pipeline (1+1 Ray workers) — then evaluates the base model
and both results with `lopt-eval` (GSM8K answer loss and accuracy, perplexity on general text).

    python -m tools.quality_study --out runs/quality

Learning rates are not tuned for either method: both give the parameters that learn from the task the same
peak rate (`--lr`), and LoPT's first half learns from reconstruction at that rate too, so neither side gets a
search the other did not. `--lopt-lr-first 5e-6` adds a LoPT run whose first half learns at another rate (an
ablation, reported beside the main comparison). Each training run is its own process, so its wall time and
peak memory are its own. A finished run or evaluation is kept (`run.json`, `eval.json` in its directory) and
reused when the study is run again with the same settings, so an interrupted study, or one given a new
variant, redoes only what is missing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lopt_dist.telemetry.metrics import read_metrics

from .evaluation.config import EvalConfig
from .evaluation.runner import evaluate
from .plot_metrics import draw, load_run


@dataclass(kw_only=True)
class StudySettings:
    data: str = "../shared/data/gsm8k/train.jsonl"
    test_data: str = "../shared/data/gsm8k/test.jsonl"
    steps: int = 30
    micro_batch_size: int = 4
    micro_batches_per_step: int = 2
    max_seq_length: int = 320
    lr: float = 5e-5
    warmup_steps: int = 3
    num_loss: int = 100
    num_accuracy: int = 40
    max_new_tokens: int = 256
    num_windows: int = 24


def train_overrides(s: StudySettings, method: str, out: Path, lr_first: float) -> list[str]:
    common = [
        f"output_dir={out}", "model.name=smollm2-135m", f"data.source={s.data}", "data.format=gsm8k",
        f"data.max_seq_length={s.max_seq_length}", f"train.steps={s.steps}",
        f"train.micro_batch_size={s.micro_batch_size}", f"train.micro_batches_per_step={s.micro_batches_per_step}",
        f"train.lr={s.lr}", f"train.lr_first={lr_first}", f"train.warmup_steps={s.warmup_steps}",
        "checkpoint.save_every=0", "logging.progress=false",
    ]
    if method == "e2e":
        return common + ["train.method=e2e", "runtime.mode=local"]
    # One worker per group: nothing to shard, so ZeRO-0 (ZeRO-2 would give the same updates, slower).
    group = "{workers: 1, threads_per_worker: 1, deepspeed_config: configs/deepspeed/zero0.json}"
    groups = f"[{group}, {group}]"
    return common + ["train.method=lopt", "runtime.mode=ray", "runtime.ray_num_cpus=2", f"runtime.groups={groups}"]


def run_name(method: str, lr_first: float, s: StudySettings) -> str:
    return method if lr_first == s.lr else f"{method}_lr_first_{lr_first:g}"


def run_training(s: StudySettings, method: str, root: Path, lr_first: float) -> dict:
    out = root / run_name(method, lr_first, s)
    cmd = [sys.executable, "-m", "lopt_dist.cli", "configs/default.yaml"]
    for item in train_overrides(s, method, out, lr_first):
        cmd += ["--set", item]
    done = _reusable(out / "run.json", {"command": " ".join(cmd[1:])})
    if done:
        return done
    print("$", " ".join(cmd), flush=True)
    start = time.monotonic()
    subprocess.run(cmd, check=True)
    wall = time.monotonic() - start
    records = read_metrics(out / "metrics.jsonl")
    peaks = {k.removesuffix("_peak_mem_bytes"): max(r[k] for r in records)
             for k in records[0] if k.endswith("peak_mem_bytes")}
    run = {"method": method, "lr_first": lr_first, "wall_s": wall, "peak_mem_bytes": peaks,
           "model_dir": str(out / "model"), "metrics": str(out / "metrics.jsonl"),
           "final_task_loss": records[-1]["task_loss"], "first_task_loss": records[0]["task_loss"],
           "command": " ".join(cmd[1:])}
    (out / "run.json").write_text(json.dumps(run, indent=2))
    return run


def _reusable(path: Path, expected: dict) -> dict | None:
    """What an earlier study wrote at `path`, if it was made with the same settings (`expected` keys)."""
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    return done if all(done.get(k) == v for k, v in expected.items()) else None


def run_eval(s: StudySettings, model: str, out: Path) -> dict:
    cfg = EvalConfig(model=model, data=s.test_data, num_loss=s.num_loss, num_accuracy=s.num_accuracy,
                     max_new_tokens=s.max_new_tokens, num_windows=s.num_windows, device="cpu")
    done = _reusable(out / "eval.json", {"eval_config": asdict(cfg)})
    if done:
        return done
    result = evaluate(cfg)
    result.pop("records", None)
    result["eval_config"] = asdict(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quality_study", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/quality", help="where runs, evaluations and results.json go")
    for name, value in asdict(StudySettings()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--lopt-lr-first", type=float, action="append", default=[],
                        help="an extra LoPT run with this first-half learning rate (repeatable)")
    args = parser.parse_args(argv)
    settings = StudySettings(**{k: getattr(args, k) for k in asdict(StudySettings())})
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    plan = [("e2e", settings.lr), ("lopt", settings.lr)] + [("lopt", v) for v in args.lopt_lr_first]
    runs = {run_name(m, v, settings): run_training(settings, m, root, v) for m, v in plan}
    evals = {"base": run_eval(settings, "smollm2-135m", root / "base")}
    evals.update({name: run_eval(settings, r["model_dir"], root / name) for name, r in runs.items()})
    draw([load_run(Path(r["metrics"]), name) for name, r in runs.items()], root / "loss_curves.png")
    results = {"settings": asdict(settings), "runs": runs, "evals": evals}
    (root / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({m: e["figures"] for m, e in evals.items()}, indent=2))
    print(json.dumps({m: {"wall_s": r["wall_s"], "peak_mem_bytes": r["peak_mem_bytes"]} for m, r in runs.items()},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
