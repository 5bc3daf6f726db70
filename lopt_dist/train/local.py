"""The single-process trainer: `lopt` stage by stage, or the end-to-end (`e2e`) baseline.

For `lopt` each micro-batch runs through the stages one at a time: a stage's forward, its own backward, then
its activations are freed and only the detached boundary goes on. Peak activation memory is therefore that of
the largest stage, not of the whole model. Optimizer steps happen after the step's last micro-batch, stage
by stage, exactly as each stage's worker group does it in the distributed pipeline. Under bf16 the trainer
follows the mixed-precision policy of `train/precision.py`, as the DeepSpeed workers do.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from lopt_dist.config import ExperimentConfig
from lopt_dist.model import Stage, causal_lm_loss, split_model
from lopt_dist.telemetry.memory import memory_snapshot, reset_peak
from lopt_dist.train.optim import build_optimizer, build_scheduler, stage_lr
from lopt_dist.train.precision import MasterWeights, run_dtype


@dataclass
class StepResult:
    step: int
    task_loss: float
    recon_losses: list[float] = field(default_factory=list)  # one per non-final stage (lopt only)
    tokens: int = 0
    seconds: float = 0.0
    lrs: list[float] = field(default_factory=list)

    def as_record(self) -> dict:
        record = {"step": self.step, "task_loss": self.task_loss, "tokens": self.tokens,
                  "step_seconds": self.seconds, "tokens_per_s": self.tokens / max(self.seconds, 1e-9)}
        record.update({f"recon_loss_{i}": v for i, v in enumerate(self.recon_losses)})
        record.update({f"lr_{i}": v for i, v in enumerate(self.lrs)})
        return record


class _Trainable:
    """A module with its optimizer, schedule and clipping: one stage, or the whole model for e2e.

    Under bf16 the optimizer steps float32 masters (`precision.MasterWeights`) and the module keeps bf16
    parameters; under float32 it steps the module itself.
    """

    def __init__(self, module: nn.Module, lr: float, cfg: ExperimentConfig) -> None:
        self.module = module
        self.masters = MasterWeights(module) if run_dtype(cfg.train) == torch.bfloat16 else None
        self.optimizer = build_optimizer(self.weights, lr, cfg.train.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.grad_clip = cfg.train.grad_clip

    @property
    def weights(self) -> nn.Module:
        """The module whose values are the trained weights: the float32 masters under bf16."""
        return self.masters.master if self.masters is not None else self.module

    def after_backward(self) -> None:
        if self.masters is not None:
            self.masters.accumulate()

    def step(self) -> None:
        if self.masters is not None:
            self.masters.step(self.optimizer, self.grad_clip)
        else:
            if self.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        if self.masters is not None:
            self.masters.load_master_state(state)
        else:
            self.module.load_state_dict(state)


class LocalTrainer:
    def __init__(self, cfg: ExperimentConfig, model: PreTrainedModel, batches, device: torch.device) -> None:
        self.cfg = cfg
        self.batches = batches  # anything with .get(micro_batch_index) -> dict of tensors
        self.device = device
        self.step = 0
        self.is_lopt = cfg.train.method == "lopt"
        if self.is_lopt:
            self.stages: list[Stage] = split_model(model, cfg.model.boundaries, cfg.train.lambda_aux, cfg.train.seed)
            for stage in self.stages:
                stage.to(device).train()
            n = len(self.stages)
            self.trainables = [_Trainable(s, stage_lr(i, n, cfg.train), cfg) for i, s in enumerate(self.stages)]
        else:
            self.model = model.to(device).train()
            self.trainables = [_Trainable(self.model, cfg.train.lr, cfg)]

    def train_step(self) -> StepResult:
        reset_peak(self.device)
        start = time.perf_counter()
        per_step = self.cfg.train.micro_batches_per_step
        task, recon, tokens = 0.0, None, 0
        for j in range(per_step):
            batch = {k: v.to(self.device) for k, v in self.batches.get(self.step * per_step + j).items()}
            tokens += int(batch["attention_mask"].sum())
            micro_task, micro_recon = (self._lopt_micro if self.is_lopt else self._e2e_micro)(batch)
            task += micro_task / per_step
            if micro_recon is not None:
                recon = [r / per_step + (recon[i] if recon else 0.0) for i, r in enumerate(micro_recon)]
        lrs = [t.scheduler.get_last_lr()[0] for t in self.trainables]
        for trainable in self.trainables:
            trainable.step()
        result = StepResult(self.step, task, recon or [], tokens, time.perf_counter() - start, lrs)
        self.step += 1
        return result

    def _lopt_micro(self, batch: dict[str, torch.Tensor]) -> tuple[float, list[float]]:
        # Each stage's graph is built, used and dropped before the next stage runs.
        per_step = self.cfg.train.micro_batches_per_step
        recon = []
        inputs = batch
        for stage, trainable in zip(self.stages, self.trainables):
            out = stage(inputs)
            (out.loss / per_step).backward()
            trainable.after_backward()
            if stage.is_last:
                return float(out.metric), recon
            recon.append(float(out.metric))
            inputs = out.boundary
            del out
        raise AssertionError("unreachable: the last stage returns")

    def _e2e_micro(self, batch: dict[str, torch.Tensor]) -> tuple[float, None]:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = causal_lm_loss(logits, batch["labels"])
        (loss / self.cfg.train.micro_batches_per_step).backward()
        self.trainables[0].after_backward()
        return float(loss.detach()), None

    def save_state(self, directory: Path) -> None:
        """Weights, optimizer and schedule of every stage, and the step, into a staged checkpoint directory."""
        for i, t in enumerate(self.trainables):
            path = directory / f"stage_{i}"
            path.mkdir(parents=True, exist_ok=True)
            torch.save({"module": t.weights.state_dict(), "optimizer": t.optimizer.state_dict(),
                        "scheduler": t.scheduler.state_dict(), "rng": torch.get_rng_state()}, path / "state.pt")

    def load_state(self, directory: Path) -> None:
        for i, t in enumerate(self.trainables):
            state = torch.load(directory / f"stage_{i}" / "state.pt", map_location=self.device, weights_only=False)
            t.load_weights(state["module"])
            t.optimizer.load_state_dict(state["optimizer"])
            t.scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
        self.step = json.loads((directory / "state.json").read_text())["step"]

    def memory(self) -> dict[str, int]:
        return memory_snapshot(self.device)

    def stage_weights(self) -> list[dict[str, torch.Tensor]]:
        """Weights for export, under the full model's names: the float32 master values under bf16."""
        return [t.weights.hf_state_dict() if self.is_lopt else t.weights.state_dict() for t in self.trainables]
