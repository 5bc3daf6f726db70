"""lopt-dist's StageWorker, measuring its own memory around set-up; the training step is lopt-dist's own.

Host RSS is the process's resident set (`/proc/self`), its peak the kernel's high-water mark, reset right
before set-up. Everything set-up imports is imported in the constructor, so the RSS before set-up is the
runtime's fixed cost (Python, torch, DeepSpeed, transformers, Ray) and the rest is the stage's.
"""

from __future__ import annotations

import torch

from lopt_dist.config import ExperimentConfig
from lopt_dist.pipeline.stage_worker import StageWorker
from lopt_dist.telemetry.memory import current_rss_bytes, peak_rss_bytes, reset_peak

from ..data import SyntheticBatches

_CPU = torch.device("cpu")


class MemoryStageWorker(StageWorker):
    def __init__(self, cfg: ExperimentConfig, stage_index: int, vocab_size: int, seq_len: int, seed: int) -> None:
        super().__init__(cfg, stage_index)
        import deepspeed  # noqa: F401  (set-up's imports, paid before the measurement starts)
        import transformers.models.llama.modeling_llama  # noqa: F401
        from deepspeed.runtime.zero import stage3  # noqa: F401

        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        self.figures: dict[str, int] = {}

    def _build_data(self) -> None:
        self.batches = SyntheticBatches(self.cfg.train.micro_batch_size, self.seq_len, self.vocab_size, self.seed)

    def setup(self, *args) -> int:
        self.figures["rss_before_setup"] = reset_peak(_CPU)
        result = super().setup(*args)
        load = getattr(self, "load_report", None)  # None on code without stage-only loading (before/after runs)
        if load is not None:
            self.figures["load_peak_rss"] = load.peak_rss_after_load
            self.figures["rss_after_load"] = load.rss_after_load
        self.figures["rss_after_engine"] = current_rss_bytes()
        self.figures["setup_peak_rss"] = peak_rss_bytes()  # read second: a peak is never below what precedes it
        if self.device.type == "cuda":
            self.figures["setup_cuda_peak_allocated"] = torch.cuda.max_memory_allocated(self.device)
        return result

    def memory_record(self) -> dict:
        """This worker's set-up figures and the parameter bytes it owns (its ZeRO-3 partition, else the stage)."""
        owned = whole = 0
        for param in self.engine.module.parameters():
            size = param.element_size()
            partition = getattr(param, "ds_tensor", None)
            owned += (partition.numel() if partition is not None else param.numel()) * size
            whole += getattr(param, "ds_numel", param.numel()) * size
        return {"stage": self.stage_index, "rank": self.rank_info.rank, "workers": self.group.workers,
                "zero_stage": self.engine.zero_optimization_stage(), "stage_param_bytes": whole,
                "owned_param_bytes": owned, **self.figures}
