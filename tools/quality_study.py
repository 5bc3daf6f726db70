"""The quality study: does LoPT learn the task and keep what the model knew, compared with end-to-end SFT?

Trains the same base model on the same samples, in the same order, for the same number of steps twice —
`e2e` in one process and `lopt` on the distributed pipeline (1+1 Ray workers) — then evaluates the base model
and both results with `lopt-eval` (GSM8K answer loss and accuracy, perplexity on general text).

    python -m tools.quality_study --out runs/quality

Learning rates are not tuned for either method: both give the parameters that learn from the task the same
peak rate (`--lr`), and LoPT's first half learns from reconstruction at that rate too, so neither side gets a
search the other did not. Each training run is its own process, so its wall time and peak memory are its own.
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
from tools.evaluation.config import EvalConfig
from tools.evaluation.runner import evaluate
from tools.plot_metrics import draw, load_run


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


def train_overrides(s: StudySettings, method: str, out: Path) -> list[str]:
    common = [
        f"output_dir={out}", "model.name=smollm2-135m", f"data.source={s.data}", "data.format=gsm8k",
        f"data.max_seq_length={s.max_seq_length}", f"train.steps={s.steps}",
        f"train.micro_batch_size={s.micro_batch_size}", f"train.micro_batches_per_step={s.micro_batches_per_step}",
        f"train.lr={s.lr}", f"train.lr_first={s.lr}", f"train.warmup_steps={s.warmup_steps}",
        "checkpoint.save_every=0", "logging.progress=false",
    ]
    if method == "e2e":
        return common + ["train.method=e2e", "runtime.mode=local"]
    groups = "[{workers: 1, threads_per_worker: 1}, {workers: 1, threads_per_worker: 1}]"
    return common + ["train.method=lopt", "runtime.mode=ray", "runtime.ray_num_cpus=2", f"runtime.groups={groups}"]


def run_training(s: StudySettings, method: str, root: Path) -> dict:
    out = root / method
    cmd = [sys.executable, "-m", "lopt_dist.cli", "configs/default.yaml"]
    for item in train_overrides(s, method, out):
        cmd += ["--set", item]
    print("$", " ".join(cmd), flush=True)
    start = time.monotonic()
    subprocess.run(cmd, check=True)
    wall = time.monotonic() - start
    records = read_metrics(out / "metrics.jsonl")
    peaks = {k.removesuffix("_peak_mem_bytes"): max(r[k] for r in records)
             for k in records[0] if k.endswith("peak_mem_bytes")}
    return {"method": method, "wall_s": wall, "peak_mem_bytes": peaks, "model_dir": str(out / "model"),
            "metrics": str(out / "metrics.jsonl"), "final_task_loss": records[-1]["task_loss"],
            "first_task_loss": records[0]["task_loss"], "command": " ".join(cmd)}


def run_eval(s: StudySettings, model: str) -> dict:
    cfg = EvalConfig(model=model, data=s.test_data, num_loss=s.num_loss, num_accuracy=s.num_accuracy,
                     max_new_tokens=s.max_new_tokens, num_windows=s.num_windows, device="cpu")
    result = evaluate(cfg)
    result.pop("records", None)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quality_study", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/quality", help="where runs, evaluations and results.json go")
    for name, value in asdict(StudySettings()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    settings = StudySettings(**{k: getattr(args, k) for k in asdict(StudySettings())})
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    runs = {m: run_training(settings, m, root) for m in ("e2e", "lopt")}
    evals = {"base": run_eval(settings, "smollm2-135m")}
    evals.update({m: run_eval(settings, r["model_dir"]) for m, r in runs.items()})
    draw([load_run(Path(r["metrics"]), m) for m, r in runs.items()], root / "loss_curves.png")
    results = {"settings": asdict(settings), "runs": runs, "evals": evals}
    (root / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({m: e["figures"] for m, e in evals.items()}, indent=2))
    print(json.dumps({m: {"wall_s": r["wall_s"], "peak_mem_bytes": r["peak_mem_bytes"]} for m, r in runs.items()},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
