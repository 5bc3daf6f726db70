"""PNGs of a benchmark report: a per-worker timeline of one step of each pipeline, and throughput/memory bars.

Both are drawn from the JSON report alone, so they can be redrawn later from a saved file. They are kept small
(low resolution, few colours) so that they can be committed under docs/.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

MIB = 1024 * 1024
DPI = 80
# Compute in blues, greens and browns; moving data in purples; waiting in grey.
COLOURS = {
    "forward": "#4c72b0",
    "backward": "#dd8452",
    "backward_input": "#f2b880",
    "backward_weight": "#8c613c",
    "optimizer": "#55a868",
    "send": "#8172b3",
    "send_wait": "#c9a0dc",
    "recv_wait": "#bbbbbb",
}
LABELS = {"forward": "forward", "backward": "backward", "backward_input": "backward (input grads)",
          "backward_weight": "backward (weight grads)", "optimizer": "optimizer step", "send": "send (post)",
          "send_wait": "send blocked (backpressure)", "recv_wait": "receive wait"}
UNSPLIT = "#eeeeee"  # pipeline-parallel rows: the rest of the step is p2p and waiting, not split by the schedule


def timeline_rows(report: dict) -> list[dict]:
    """The rows a timeline shows: every pipeline that ran and logged events."""
    return [r for r in report["rows"] if r["kind"] in ("pipeline", "lopt-dist") and r["status"] == "ok"
            and any(w["events"] for w in r["worker_stats"])]


def plot_timelines(report: dict, path: Path) -> Path | None:
    rows = timeline_rows(report)
    if not rows:
        return None
    heights = [len(r["worker_stats"]) for r in rows]
    height_in = 0.45 * sum(heights) + 0.9 * len(rows) + 1.0
    fig, axes = plt.subplots(len(rows), 1, figsize=(10, height_in), gridspec_kw={"height_ratios": heights},
                             squeeze=False)
    for ax, row in zip(axes[:, 0], rows):
        _draw_row(ax, row)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLOURS.values()]
    labels = [LABELS[k] for k in COLOURS]
    handles.append(plt.Rectangle((0, 0), 1, 1, color=UNSPLIT))
    labels.append("p2p send/receive or waiting (not split)")
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=7, frameon=False)
    fig.suptitle("One training step per worker (the last measured step)", fontsize=9)
    fig.tight_layout(rect=(0, 0.55 / height_in, 1, 1 - 0.3 / height_in))  # room for the legend and title
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _draw_row(ax, row: dict) -> None:
    workers = row["worker_stats"]
    span = max((e["end"] for w in workers for e in w["events"]), default=1.0)
    for y, worker in enumerate(workers):
        if row["kind"] == "pipeline" and worker["events"]:
            start = min(e["start"] for e in worker["events"])
            ax.broken_barh([(start, span - start)], (y - 0.4, 0.8), color=UNSPLIT)
        bars = {}
        for e in worker["events"]:
            bars.setdefault(e["kind"], []).append((e["start"], e["end"] - e["start"]))
        for kind, spans in bars.items():
            # Thin white edges keep back-to-back micro-batches apart.
            ax.broken_barh(spans, (y - 0.4, 0.8), facecolor=COLOURS.get(kind, "black"), edgecolor="white",
                           linewidth=0.4)
    ax.set_yticks(range(len(workers)), [w["label"] for w in workers], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, span)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(f"{row['name']}: step {row['step_s'][-1]:.2f} s", fontsize=8, loc="left")
    ax.set_xlabel("seconds since the first worker started this step", fontsize=7)


def plot_bars(report: dict, path: Path) -> Path | None:
    rows = [r for r in report["rows"] if r["status"] == "ok"]
    if not rows:
        return None
    names = [r["name"] for r in rows]
    median = [r["tokens_per_s_median"] for r in rows]
    low = [m - r["tokens_per_s_min"] for m, r in zip(median, rows)]
    high = [r["tokens_per_s_max"] - m for m, r in zip(median, rows)]
    colours = ["#c44e52" if r["name"] == "lopt-dist" else "#4c72b0" for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
    left.bar(names, median, yerr=[low, high], color=colours, capsize=3)
    left.set_title("tokens/s (median, min-max over measured steps)", fontsize=8)
    right.bar(names, [r["peak_mem_max_bytes"] / MIB for r in rows], color=colours)
    right.set_title(f"peak memory of the largest worker, MiB ({rows[0]['worker_stats'][0]['mem_kind']})", fontsize=8)
    for ax in (left, right):
        ax.tick_params(axis="x", labelrotation=40, labelsize=7)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
