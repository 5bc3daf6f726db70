"""Which rows this invocation runs, with what layout, and why a row cannot run here when it cannot."""

from __future__ import annotations

from dataclasses import dataclass

from .config import BenchConfig
from .models import ModelInfo, stage_problem
from .pipeline_pp import SCHEDULE_SPECS


@dataclass(frozen=True, kw_only=True)
class PlannedRow:
    name: str  # "e2e", "lopt", "stage-alone", "pp-1f1b", "zero2", "lopt-dist"
    kind: str  # "single-device", "stage-alone", "pipeline", "data-parallel", "lopt-dist"
    workers: int
    threads_per_worker: int
    layout: str  # in words, for the terminal
    method: str | None = None  # single-device rows
    schedule: str | None = None  # pipeline rows
    skip_reason: str | None = None


def plan_rows(cfg: BenchConfig, model: ModelInfo, gpu: bool, gpus: int) -> list[PlannedRow]:
    workers, threads, micro = cfg.workers, cfg.threads_per_worker, cfg.micro_batches
    unit = "GPU" if gpu else f"{threads} thread{'s' if threads > 1 else ''}"
    too_few = f"needs {workers} GPUs, one per worker, and this machine has {gpus}" if gpu and gpus < workers else None
    split = stage_problem(model.num_layers, workers)
    rows = []
    for name in cfg.rows:
        if name in ("e2e", "lopt"):
            one = "1 GPU" if gpu else f"1 worker x {cfg.single_device_threads} threads"
            rows.append(PlannedRow(name=name, kind="single-device", workers=1, method=name, layout=one,
                                   threads_per_worker=cfg.single_device_threads,
                                   skip_reason=split if name == "lopt" else None))
        elif name == "stage-alone":
            rows.append(PlannedRow(name=name, kind="stage-alone", workers=1, threads_per_worker=threads,
                                   layout=f"each of {workers} stages alone on 1 worker x {unit}", skip_reason=split))
        elif name == "pp":
            rows += [_pipeline_row(cfg, model, s, unit, too_few) for s in cfg.schedules]
        elif name == "zero2":
            uneven = (f"ZeRO-2 gives each of the {workers} workers whole micro-batches, and {micro} micro-batches "
                      f"do not split evenly over {workers} workers; use --micro-batches a multiple of {workers}"
                      ) if micro % workers else None
            rows.append(PlannedRow(name=name, kind="data-parallel", workers=workers, threads_per_worker=threads,
                                   layout=f"{workers} workers x {unit}, whole model each",
                                   skip_reason=too_few or uneven))
        else:
            rows.append(PlannedRow(name=name, kind="lopt-dist", workers=workers, threads_per_worker=threads,
                                   layout=f"{workers} stages x 1 worker x {unit}", skip_reason=too_few or split))
    return rows


def _pipeline_row(cfg: BenchConfig, model: ModelInfo, schedule: str, unit: str, too_few: str | None) -> PlannedRow:
    spec = SCHEDULE_SPECS[schedule]
    chunks = cfg.workers * spec.stages_per_rank
    per_rank = f", {spec.stages_per_rank} stages per rank" if spec.stages_per_rank > 1 else ""
    return PlannedRow(name=f"pp-{schedule}", kind="pipeline", workers=cfg.workers, schedule=schedule,
                      threads_per_worker=cfg.threads_per_worker,
                      layout=f"{cfg.workers} ranks x {unit}{per_rank}, {cfg.micro_batches} micro-batches",
                      skip_reason=too_few or stage_problem(model.num_layers, chunks)
                      or schedule_problem(schedule, cfg.micro_batches, cfg.workers, chunks))


def schedule_problem(schedule: str, micro_batches: int, workers: int, stages: int) -> str | None:
    """The sizes a torch.distributed.pipelining schedule refuses, said before any worker starts."""
    if schedule == "1f1b" and micro_batches < stages:
        return f"1F1B needs at least as many micro-batches as stages ({stages}); got {micro_batches}"
    if schedule in ("interleaved-1f1b", "interleaved-zb"):
        rounds = max(1, micro_batches // workers)
        if micro_batches % rounds:
            return (f"{schedule} runs micro-batches in rounds of {workers} (one per rank) and {micro_batches} "
                    f"micro-batches do not make whole rounds; use a multiple of {workers}")
    return None
