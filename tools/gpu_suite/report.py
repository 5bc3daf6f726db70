"""The suite's report: gpu_suite.json (every figure) and gpu_suite.md (what a person reads)."""

from __future__ import annotations

import json
from pathlib import Path

MIB = 1024 * 1024


def write_reports(report: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_suite.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu_suite.md").write_text(markdown(report))
    return [out / "gpu_suite.json", out / "gpu_suite.md"]


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU check suite: {report['verdict']}", "",
             f"Command: `{report['command']}`  ", f"Created: {report['created']}  ",
             f"Machine: {', '.join(env.get('gpus') or ['no GPU'])}; torch {env.get('torch')}, CUDA {env.get('cuda')}, "
             f"{env.get('cpu_cores')} CPU cores", "",
             "| step | status | seconds | what | checks |", "|---|---|---|---|---|"]
    for step in report["steps"]:
        checks = ", ".join(f"{name}: {'ok' if ok else 'FAILED'}" for name, ok in step.get("checks", {}).items())
        status = step["status"] + (f" ({step['reason']})" if step.get("reason") else "")
        lines.append(f"| {step['name']} | {status} | {step.get('seconds', 0):.0f} | {step['describes']} | {checks} |")
    lines += ["", *_training_table(report["steps"]), "", *_bench_table(report["steps"])]
    failed = [s for s in report["steps"] if s["status"] == "failed"]
    for step in failed:
        lines += ["", f"## {step['name']} failed", "", "```", step.get("log_tail", "").rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _training_table(steps: list[dict]) -> list[str]:
    rows = [s for s in steps if s["kind"].startswith("train") and s.get("figures", {}).get("steps")]
    if not rows:
        return []
    lines = ["## Training runs (lopt-train, bf16)", "",
             "| run | steps | task loss first -> last | tokens/s (median) | step s | peak MiB (per worker) | busy |",
             "|---|---|---|---|---|---|---|"]
    for s in rows:
        f = s["figures"]
        peaks = ", ".join(f"{k} {v / MIB:.0f}" for k, v in f["peak_mem_bytes"].items())
        busy = ", ".join(f"{k} {100 * v:.0f}%" for k, v in f.get("busy_frac_median", {}).items())
        lines.append(f"| {s['name']} | {f['steps']} | {f['task_loss_first']:.3f} -> {f['task_loss_last']:.3f} | "
                     f"{f['tokens_per_s_median']:.0f} | {f['step_s_median']:.3f} | {peaks} | {busy} |")
    return lines


def _bench_table(steps: list[dict]) -> list[str]:
    rows = [s for s in steps if s["kind"] == "bench" and s.get("figures", {}).get("rows")]
    if not rows:
        return []
    lines = ["## lopt-bench single-device rows (bf16)", "",
             "| model | row | tokens/s (median) | step s | peak MiB | MFU |", "|---|---|---|---|---|---|"]
    for s in rows:
        f = s["figures"]
        for name, r in f["rows"].items():
            if r["status"] != "ok":
                lines.append(f"| {f['model']} | {name} | {r['status']}: {r['message']} | | | |")
                continue
            mfu = f"{100 * r['mfu']:.1f}% of {r['peak_tflops']:g} TFLOP/s" if r["mfu"] is not None else "n/a"
            lines.append(f"| {f['model']} ({f['parameters'] / 1e6:.0f}M) | {name} | {r['tokens_per_s_median']:.0f} | "
                         f"{r['step_s_median']:.3f} | {r['peak_mem_bytes'] / MIB:.0f} | {mfu} |")
    return lines
