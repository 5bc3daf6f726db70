"""Runs each layout in fresh workers on one random bf16 Llama, and measures the driver's export.

The model is saved once per size (bf16 safetensors, in shards of at most 5 GB as hub checkpoints come) by a
separate process, so that the driver's own RSS holds none of it.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from lopt_dist.config import (
    CheckpointConfig, DataConfig, ExperimentConfig, GroupConfig, LoggingConfig, ModelConfig, RuntimeConfig,
    TrainConfig,
)
from lopt_dist.checkpoint.export import DEFAULT_SHARD_BYTES, ModelFiles, export_to
from lopt_dist.model.loading import build_once, cache_dir, load_tokenizer
from lopt_dist.model.tiny import tiny_config
from lopt_dist.pipeline.driver import PipelineDriver
from lopt_dist.run import prepare
from lopt_dist.telemetry.memory import peak_rss_bytes, reset_peak, step_peak_bytes

from .worker import MemoryStageWorker

DEEPSPEED_DIR = Path(__file__).resolve().parents[3] / "configs" / "deepspeed"

# Llama sizes by name: (hidden, layers, intermediate, heads, kv heads, vocab). The vocabulary is the embedded
# SmolLM2 tokenizer's, saved with each model, so a run passes the same pre-start checks as a user's.
SIZES = {
    "tiny": (64, 4, 128, 4, 2, 49152),
    "50m": (512, 8, 1536, 8, 4, 49152),
    "125m": (768, 12, 2048, 12, 4, 49152),
    "500m": (1536, 16, 4096, 12, 4, 49152),
    "1b": (2048, 16, 5632, 16, 8, 49152),
    "70b": (8192, 80, 28672, 64, 8, 128256),  # Llama-3-70B's shape, for the projection only
}


@dataclass(frozen=True)
class Layout:
    workers: tuple[int, ...]  # per stage
    zero: int  # ZeRO stage of every group's JSON

    @property
    def name(self) -> str:
        return f"{'+'.join(map(str, self.workers))} zero{self.zero}"

    @classmethod
    def parse(cls, text: str) -> Layout:
        """'2+2:zero3' -> Layout((2, 2), 3)."""
        sizes, _, zero = text.partition(":")
        if not zero.startswith("zero") or not zero[4:].isdigit() or int(zero[4:]) > 3:
            raise ValueError(f"layout {text!r}: expected WORKERS+WORKERS:zeroN, e.g. 2+2:zero3")
        workers = tuple(int(w) for w in sizes.split("+"))
        if len(workers) < 2 or min(workers) < 1:
            raise ValueError(f"layout {text!r}: give at least two stages of at least one worker")
        return cls(workers, int(zero[4:]))


@dataclass(frozen=True)
class Settings:
    size: str
    layouts: tuple[Layout, ...]
    steps: int = 2
    seq_len: int = 128
    micro_batch_size: int = 1
    threads_per_worker: int = 1
    device: str = "auto"
    seed: int = 0
    out_dir: str = "bench-memory"


def llama_config(size: str) -> PretrainedConfig:
    hidden, layers, intermediate, heads, kv_heads, vocab = SIZES[size]
    return tiny_config("llama", vocab, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096)


def random_bf16_model(size: str, seed: int) -> Path:
    """The seeded random Llama of `size`, saved in bf16 once into the cache."""
    config = llama_config(size)
    key = hashlib.sha256(json.dumps([config.to_dict(), seed], sort_keys=True, default=str).encode()).hexdigest()
    target = cache_dir() / "bench-models" / f"llama-{size}-bf16-{key[:12]}"

    def build(out_dir: Path) -> None:
        process = multiprocessing.get_context("spawn").Process(target=_save, args=(config.to_dict(), seed, out_dir))
        process.start()
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"saving the random {size} model failed (exit code {process.exitcode})")

    return build_once(target, build)


def _save(config: dict, seed: int, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig.from_dict(config), dtype=torch.bfloat16)
    model.save_pretrained(out_dir, max_shard_size="5GB")
    load_tokenizer("smollm2-135m").save_pretrained(out_dir)


def experiment(settings: Settings, layout: Layout, model_dir: Path) -> ExperimentConfig:
    per_step = 2 * max(layout.workers)  # two micro-batches per worker of the widest group
    ds_file = str(DEEPSPEED_DIR / f"zero{layout.zero}.json")
    groups = [GroupConfig(workers=w, deepspeed_config=ds_file, threads_per_worker=settings.threads_per_worker)
              for w in layout.workers]
    num_layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    stages = len(layout.workers)
    cfg = ExperimentConfig(
        name="lopt-bench-memory", output_dir=f"{settings.out_dir}/run",
        model=ModelConfig(name=str(model_dir), boundaries=[num_layers * i // stages for i in range(1, stages)]),
        data=DataConfig(builtin_samples=8),
        train=TrainConfig(steps=settings.steps, micro_batch_size=settings.micro_batch_size,
                          micro_batches_per_step=per_step, dtype="bfloat16", seed=settings.seed),
        runtime=RuntimeConfig(mode="ray", device=settings.device, groups=groups),
        checkpoint=CheckpointConfig(export=False), logging=LoggingConfig(progress=False),
    )
    return prepare(cfg)


def run_layout(settings: Settings, layout: Layout, model_dir: Path, progress) -> dict:
    """One layout in fresh workers: set-up, `steps` training steps, then the driver's export."""
    cfg = experiment(settings, layout, model_dir)
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    driver = PipelineDriver.start(cfg, worker_cls=MemoryStageWorker, extra_init_args=(vocab, settings.seq_len,
                                                                                    settings.seed))
    try:
        progress(f"{layout.name}: set up, training {settings.steps} steps")
        peaks: dict[tuple[int, int], int] = {}
        for report in driver.steps(0, settings.steps, lambda done: None):
            for w in report.workers:
                peaks[w.stage, w.rank] = max(peaks.get((w.stage, w.rank), 0), step_peak_bytes(w.memory))
        workers = [record for group in driver.groups for record in group.execute("memory_record")]
        for record in workers:
            record["step_peak"] = peaks[record["stage"], record["rank"]]
        progress(f"{layout.name}: exporting")
        export = measure_export(driver, model_dir, Path(settings.out_dir) / "export")
    finally:
        driver.shutdown()
    return {"layout": layout.name, "stages": list(layout.workers), "zero": layout.zero, "workers": workers,
            "export": export}


def measure_export(driver: PipelineDriver, model_dir: Path, out: Path) -> dict:
    """The driver's peak RSS while exporting, through the run's own export path: each stage's workers write
    its bf16 shards, the driver only joins their metadata into the index, config and tokenizer."""
    files = ModelFiles(AutoConfig.from_pretrained(model_dir), None)
    floor = reset_peak(torch.device("cpu"))
    export_to(out, lambda directory: driver.export_shards(directory, DEFAULT_SHARD_BYTES, torch.bfloat16), files,
              torch.bfloat16)
    peak = peak_rss_bytes()
    shutil.rmtree(out, ignore_errors=True)
    return {"driver_rss_before": floor, "driver_peak_rss": peak}
