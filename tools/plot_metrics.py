"""`lopt-plot METRICS_JSONL... [--labels ...] [--out PNG]`: training curves from lopt-dist's metrics.jsonl.

One run: task and reconstruction losses, tokens/s, and (Ray pipeline runs) how each worker spent its steps.
Several runs: their task losses and tokens/s overlaid, e.g.
  lopt-plot e2e/metrics.jsonl lopt/metrics.jsonl --labels e2e lopt --out curves.png
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters, and no GUI toolkit to import
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.axes import Axes  # noqa: E402

from lopt_dist.telemetry.metrics import read_metrics  # noqa: E402

_WORKER = re.compile(r"^(s\d+w\d+)_busy_frac$")


class PlotError(ValueError):
    """A user-fixable problem with the metrics files; the message names the file and the fix."""


@dataclass(kw_only=True)
class Run:
    label: str
    records: list[dict[str, Any]]
    workers: list[str] = field(default_factory=list)  # "s<stage>w<rank>" keys, in stage then rank order

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of the records that have `key`."""
        rows = [r for r in self.records if key in r]
        return [r["step"] for r in rows], [r[key] for r in rows]

    def recon_keys(self) -> list[str]:
        keys = {k for r in self.records for k in r if k.startswith("recon_loss_")}
        return sorted(keys, key=lambda k: int(k.rsplit("_", 1)[1]))


def load_run(path: Path, label: str) -> Run:
    if not path.is_file():
        raise PlotError(f"metrics file {path} does not exist; give the metrics.jsonl of a run directory")
    try:
        records = read_metrics(path)
    except ValueError as err:  # json.JSONDecodeError
        raise PlotError(f"{path} is not a metrics.jsonl (one JSON object a line): {err}") from None
    if not records or any("step" not in r or "task_loss" not in r for r in records):
        raise PlotError(f"{path} has no steps with 'step' and 'task_loss'; is it a lopt-dist metrics.jsonl?")
    workers = sorted({m[1] for r in records for k in r if (m := _WORKER.match(k))},
                     key=lambda w: tuple(int(n) for n in re.findall(r"\d+", w)))
    return Run(label=label, records=records, workers=workers)


def plot_losses(ax: Axes, run: Run) -> None:
    ax.plot(*run.series("task_loss"), color="tab:blue", label="task loss")
    ax.set_xlabel("step")
    ax.set_ylabel("task loss", color="tab:blue")
    recon = run.recon_keys()
    if recon:
        # Reconstruction losses are unweighted MSEs of hidden states, on a scale unlike cross-entropy: own axis.
        twin = ax.twinx()
        for i, key in enumerate(recon):
            twin.plot(*run.series(key), color=plt.cm.Oranges(0.5 + 0.4 * i / max(len(recon) - 1, 1)),
                      linestyle="--", label=f"reconstruction {key.rsplit('_', 1)[1]}")
        twin.set_ylabel("reconstruction loss", color="tab:orange")
        lines = ax.get_lines() + twin.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    ax.set_title(f"{run.label}: losses")
    ax.grid(alpha=0.3)


def plot_throughput(ax: Axes, runs: list[Run]) -> None:
    for run in runs:
        ax.plot(*run.series("tokens_per_s"), label=run.label)
    ax.set_xlabel("step")
    ax.set_ylabel("tokens / s")
    ax.set_title("throughput")
    ax.grid(alpha=0.3)
    if len(runs) > 1:
        ax.legend()


def plot_workers(ax: Axes, run: Run) -> None:
    """Per worker, the mean share of a step spent computing, waiting to receive, waiting to send, and the rest.

    busy_frac is already a share of the worker's step; the waits are seconds, so they are divided by the
    step's wall time, which the worker's own wall time matches to within the driver's overhead.
    """
    shares = {name: [] for name in ("busy", "recv wait", "send wait")}
    for worker in run.workers:
        rows = [r for r in run.records if f"{worker}_busy_frac" in r]
        shares["busy"].append(_mean(r[f"{worker}_busy_frac"] for r in rows))
        for part, key in (("recv wait", "recv_wait_s"), ("send wait", "send_wait_s")):
            shares[part].append(_mean(r[f"{worker}_{key}"] / max(r["step_seconds"], 1e-9) for r in rows))
    shares["other"] = [max(0.0, 1 - sum(s[i] for s in shares.values())) for i in range(len(run.workers))]
    bottom = [0.0] * len(run.workers)
    colors = {"busy": "tab:green", "recv wait": "tab:red", "send wait": "tab:purple", "other": "lightgray"}
    for part, values in shares.items():
        ax.bar(run.workers, values, bottom=bottom, label=part, color=colors[part])
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("share of step (mean over steps)")
    ax.set_ylim(0, max(1.0, max(bottom)))
    ax.set_title(f"{run.label}: worker time (stage s, rank w)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")  # outside: bars reach the top


def plot_compared_losses(ax: Axes, runs: list[Run]) -> None:
    for run in runs:
        ax.plot(*run.series("task_loss"), label=run.label)
    ax.set_xlabel("step")
    ax.set_ylabel("task loss")
    ax.set_title("task loss")
    ax.grid(alpha=0.3)
    ax.legend()


def draw(runs: list[Run], out: Path) -> Path:
    single = len(runs) == 1
    panels = 3 if single and runs[0].workers else 2
    fig, axes = plt.subplots(panels, 1, figsize=(9, 3.6 * panels))
    if single:
        plot_losses(axes[0], runs[0])
    else:
        plot_compared_losses(axes[0], runs)
    plot_throughput(axes[1], runs)
    if panels == 3:
        plot_workers(axes[2], runs[0])
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def default_out(paths: list[Path]) -> Path:
    """Beside a single run's metrics; in the current directory when several runs are compared."""
    return paths[0].with_name("metrics.png") if len(paths) == 1 else Path("curves.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lopt-plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", nargs="+", type=Path, help="metrics.jsonl files, one per run")
    parser.add_argument("--labels", nargs="+", help="one name per run (default: each file's directory name)")
    parser.add_argument("--out", type=Path, help="PNG to write (default: metrics.png beside one run, else curves.png)")
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.metrics):
        parser.error(f"--labels gives {len(args.labels)} names for {len(args.metrics)} metrics files")
    labels = args.labels or [p.resolve().parent.name for p in args.metrics]
    try:
        runs = [load_run(path, label) for path, label in zip(args.metrics, labels)]
    except PlotError as err:
        print(f"lopt-plot: error: {err}", file=sys.stderr)
        return 2
    out = draw(runs, args.out or default_out(args.metrics))
    print(f"lopt-plot: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
