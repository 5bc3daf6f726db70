"""Figures and pass/fail checks read from each step's outputs (junit XML, metrics.jsonl, bench.json)."""

from __future__ import annotations

import json
import math
import statistics
import xml.etree.ElementTree as ET
from pathlib import Path

from .steps import Step

WARMUP_STEPS = 2  # left out of throughput medians: allocation, kernel selection, lazy start-up


def read_step(step: Step, out: Path) -> tuple[dict, dict[str, bool]]:
    """(figures, {check: passed}) for a step that ran; missing outputs fail the step's checks."""
    reader = {"tests": _tests, "train-local": _train, "train-pipeline": _train, "bench": _bench}[step.kind]
    try:
        return reader(out / step.out)
    except (OSError, ValueError, KeyError, ET.ParseError) as err:
        return {"error": f"{type(err).__name__}: {err}"}, {"outputs readable": False}


def _tests(directory: Path) -> tuple[dict, dict[str, bool]]:
    suite = ET.parse(directory / "junit.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = [case.get("name") for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {**counts, "failed": failed}, {"no test failed": not failed and counts["errors"] == 0,
                                          "some test ran": counts["passed"] > 0}


def _train(directory: Path) -> tuple[dict, dict[str, bool]]:
    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError("metrics.jsonl has no step")
    losses = [r["task_loss"] for r in records]
    figures = {"steps": len(records), "task_loss_first": losses[0], "task_loss_last": losses[-1],
               "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in _measured(records)),
               "step_s_median": statistics.median(r["step_seconds"] for r in _measured(records))}
    peaks = {k.removesuffix("peak_mem_bytes").rstrip("_") or "process": max(r[k] for r in records)
             for k in records[0] if k.endswith("peak_mem_bytes")}
    figures["peak_mem_bytes"] = peaks  # "process" (single process) or "s0w0", "s1w0", ... (per worker)
    busy = {k.removesuffix("_busy_frac"): statistics.median(r[k] for r in _measured(records))
            for k in records[0] if k.endswith("_busy_frac")}
    if busy:
        figures["busy_frac_median"] = busy
    window = max(1, len(losses) // 4)
    checks = {"losses finite": all(math.isfinite(x) for x in losses),
              "loss falling": statistics.fmean(losses[-window:]) < statistics.fmean(losses[:window])}
    return figures, checks


def _measured(records: list[dict]) -> list[dict]:
    return records[WARMUP_STEPS:] if len(records) > WARMUP_STEPS else records


def _bench(directory: Path) -> tuple[dict, dict[str, bool]]:
    report = json.loads((directory / "bench.json").read_text())
    rows = {r["name"]: {"status": r["status"], "message": r["message"], "tokens_per_s_median": r["tokens_per_s_median"],
                        "step_s_median": r["step_s_median"], "peak_mem_bytes": r["peak_mem_max_bytes"],
                        "mfu": r.get("mfu"), "peak_tflops": r.get("peak_tflops"), "losses": r["losses"]}
            for r in report["rows"]}
    model = report["model"]
    figures = {"model": model["name"], "parameters": model["parameters"], "settings": {
        k: report["settings"][k] for k in ("seq_len", "global_batch", "micro_batches", "tokens_per_step", "dtype")},
        "gpus": report["environment"].get("gpus", []), "rows": rows}
    checks = {"every row ran": all(r["status"] == "ok" for r in rows.values()),
              "losses finite": all(math.isfinite(x) for r in rows.values() for x in r["losses"])}
    return figures, checks
