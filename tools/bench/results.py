"""From the workers' raw records to the figures the report shows, warm-up steps left out.

Step time: the step ends when its last worker ends it, so step k lasts from the latest end of step k-1 to the
latest end of step k (for a streaming pipeline, whose stages work on different steps at once, this is the
rate at which steps come out). Busy fraction: a worker's computing time over its own step windows; the rest
(bubble) is sending, receiving and waiting.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from .config import BenchConfig
from .flops import matmul_parameters, mfu, training_flops_per_token
from .measure import Event, WorkerRecord
from .models import ModelInfo
from .runner import RowRun
from .stage_alone import StageTimes

REFERENCE_ROW = "lopt-dist"


@dataclass(kw_only=True)
class WorkerSummary:
    label: str
    device: str
    busy_frac: float
    bubble_frac: float
    comm_s_per_step: float | None  # blocked on communication; None where it could not be measured
    bytes_sent_per_step: float | None  # None where it could not be measured
    bytes_received_per_step: float | None
    peak_mem_bytes: int
    mem_at_start_bytes: int
    mem_kind: str
    # The last step, in seconds from the moment the first worker started it: workers of a streaming pipeline
    # work on one step at different times, and a common origin shows it.
    events: list[Event] = field(default_factory=list)


@dataclass(kw_only=True)
class RowSummary:
    name: str
    kind: str
    layout: str
    status: str
    message: str | None
    details: str | None
    workers: int
    threads_per_worker: int
    wall_s: float
    # 1/5/15-minute load before and after the row: did other work share the machine meanwhile?
    load_average: tuple[list[float] | None, list[float] | None]
    step_s: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    tokens_per_s_median: float | None = None
    tokens_per_s_min: float | None = None
    tokens_per_s_max: float | None = None
    step_s_median: float | None = None
    losses: list[float] = field(default_factory=list)  # task loss of every step, warm-up included
    peak_mem_max_bytes: int | None = None
    bytes_moved_per_step: float | None = None  # sum over workers of the bytes each sent
    comm_s_per_step: float | None = None  # mean over workers
    worker_stats: list[WorkerSummary] = field(default_factory=list)
    vs_lopt_dist: dict[str, float | None] = field(default_factory=dict)
    predicted_tokens_per_s: float | None = None  # the bound its stages, timed alone, allow
    of_predicted: float | None = None
    mfu: float | None = None  # GPU rows: model FLOPs per second over the peak of the GPUs used (flops.py)
    peak_tflops: float | None = None  # that peak, per GPU


def summarize_row(run: RowRun, cfg: BenchConfig) -> RowSummary:
    row = run.row
    summary = RowSummary(name=row.name, kind=row.kind, layout=row.layout, status=run.status, message=run.message,
                         details=run.details, workers=row.workers, threads_per_worker=row.threads_per_worker,
                         wall_s=run.wall_s, load_average=run.load_average)
    if run.status != "ok" or not run.records:
        return summary
    records, warmup = run.records, cfg.warmup_steps
    ends = [max(r.windows[k][1] for r in records) for k in range(cfg.total_steps)]
    summary.step_s = [ends[k] - ends[k - 1] for k in range(warmup, cfg.total_steps)]
    counted = [r.tokens for r in records if r.tokens is not None]  # --data: the real tokens of each step
    tokens = ([sum(t[k] for t in counted) for k in range(warmup, cfg.total_steps)] if counted
              else [cfg.tokens_per_step] * len(summary.step_s))
    summary.tokens_per_s = [n / s for n, s in zip(tokens, summary.step_s)]
    summary.tokens_per_s_median = statistics.median(summary.tokens_per_s)
    summary.tokens_per_s_min, summary.tokens_per_s_max = min(summary.tokens_per_s), max(summary.tokens_per_s)
    summary.step_s_median = statistics.median(summary.step_s)
    with_loss = [r.loss_sums for r in records if r.loss_sums is not None]
    if with_loss:
        summary.losses = [sum(sums[k] for sums in with_loss) / cfg.micro_batches for k in range(cfg.total_steps)]
    origin = min(r.windows[-1][0] for r in records)
    summary.worker_stats = [_worker_summary(r, warmup, origin) for r in records]
    summary.peak_mem_max_bytes = max(w.peak_mem_bytes for w in summary.worker_stats)
    sent = [w.bytes_sent_per_step for w in summary.worker_stats]
    summary.bytes_moved_per_step = None if None in sent else sum(sent)
    comm = [w.comm_s_per_step for w in summary.worker_stats]
    summary.comm_s_per_step = None if None in comm else statistics.fmean(comm)
    return summary


def _worker_summary(record: WorkerRecord, warmup: int, origin: float) -> WorkerSummary:
    measured = slice(warmup, None)
    wall = sum(end - start for start, end in record.windows[measured])
    busy = sum(record.busy_s[measured])
    return WorkerSummary(
        label=record.label, device=record.device, busy_frac=busy / wall, bubble_frac=1.0 - busy / wall,
        comm_s_per_step=_mean(record.comm_s[measured]),
        bytes_sent_per_step=_mean(record.bytes_sent[measured]),
        bytes_received_per_step=_mean(record.bytes_received[measured]),
        peak_mem_bytes=record.peak_mem_bytes, mem_at_start_bytes=record.mem_at_start_bytes, mem_kind=record.mem_kind,
        events=[Event(e.kind, e.start - origin, e.end - origin, e.micro_batch, e.stage) for e in record.events],
    )


def _mean(values: list[float | None]) -> float | None:
    return None if None in values else statistics.fmean(values)


@dataclass(kw_only=True)
class StagePrediction:
    """What the stages, each timed alone, predict for a pipeline over them (seconds per optimizer step)."""

    lopt_stage_s: list[float]  # M x (forward + backward) + optimizer, LoPT stages
    e2e_stage_s: list[float]  # the same for the end-to-end chunks
    lopt_bound_tokens_per_s: float  # bubble-free lopt-dist: the slowest stage sets the pace
    e2e_bound_tokens_per_s: float  # bubble-free end-to-end pipeline over the same cut
    lopt_one_worker_tokens_per_s: float  # all LoPT stages one after another on one worker's threads
    imbalance: float  # slowest LoPT stage over the mean one; 1.0 is perfectly balanced


def predict(stages: list[StageTimes], cfg: BenchConfig) -> StagePrediction:
    m = cfg.micro_batches
    lopt = [m * s.lopt_s + s.optimizer_s for s in stages]
    e2e = [m * (s.e2e_forward_s + s.e2e_backward_s) + s.optimizer_s for s in stages]
    tokens = cfg.tokens_per_step
    return StagePrediction(lopt_stage_s=lopt, e2e_stage_s=e2e, lopt_bound_tokens_per_s=tokens / max(lopt),
                           e2e_bound_tokens_per_s=tokens / max(e2e), lopt_one_worker_tokens_per_s=tokens / sum(lopt),
                           imbalance=max(lopt) / statistics.fmean(lopt))


def compare(rows: list[RowSummary], prediction: StagePrediction | None) -> None:
    """Fill in each row's ratios to the lopt-dist row and, where its stage cut was timed, to its bound."""
    reference = next((r for r in rows if r.name == REFERENCE_ROW and r.status == "ok"), None)
    for row in rows:
        if row.status != "ok":
            continue
        if reference is not None:
            row.vs_lopt_dist = {
                "tokens_per_s": row.tokens_per_s_median / reference.tokens_per_s_median,
                "step_s": row.step_s_median / reference.step_s_median,
                "peak_mem": row.peak_mem_max_bytes / reference.peak_mem_max_bytes,
            }
        bound = _bound_for(row.name, prediction)
        if bound is not None:
            row.predicted_tokens_per_s, row.of_predicted = bound, row.tokens_per_s_median / bound


def _bound_for(name: str, prediction: StagePrediction | None) -> float | None:
    # Only rows that run exactly the timed cut: the interleaved and zero-bubble schedules cut twice as fine.
    if prediction is None:
        return None
    return {REFERENCE_ROW: prediction.lopt_bound_tokens_per_s, "pp-gpipe": prediction.e2e_bound_tokens_per_s,
            "pp-1f1b": prediction.e2e_bound_tokens_per_s}.get(name)


def fill_mfu(rows: list[RowSummary], cfg: BenchConfig, model: ModelInfo, peak_tflops: float | None) -> None:
    """MFU of every measured GPU row (one GPU per worker); left None when the GPU's peak is unknown."""
    if peak_tflops is None:
        return
    params = matmul_parameters(model.parameters, model.vocab_size, model.hidden_size, model.tied_embeddings)
    per_token = training_flops_per_token(params, model.num_layers, model.hidden_size, cfg.seq_len)
    for row in rows:
        if row.status == "ok":
            gpus = 1 if row.kind == "single-device" else row.workers
            row.mfu, row.peak_tflops = mfu(row.tokens_per_s_median, per_token, peak_tflops, gpus), peak_tflops
