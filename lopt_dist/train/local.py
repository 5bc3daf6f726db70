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

from lopt_dist.checkpoint.local_state import (
    load_module_state,
    load_process_rng,
    save_module_state,
    save_process_rng,
)
from lopt_dist.config import ExperimentConfig
from lopt_dist.model import Stage, causal_lm_loss, split_model
from lopt_dist.model.glue import router_aux_loss_coef
from lopt_dist.model.lora import apply_model_lora, merged_state_dict
from lopt_dist.telemetry.memory import memory_snapshot, reset_peak
from lopt_dist.train.optim import build_optimizer, build_scheduler, stage_lr
from lopt_dist.train.precision import MasterWeights, global_norm, run_dtype


@dataclass
class StepResult:
    step: int
    task_loss: float
    recon_losses: list[float] = field(default_factory=list)  # one per non-final stage (lopt only)
    tokens: int = 0
    seconds: float = 0.0
    lrs: list[float] = field(default_factory=list)  # per stage (e2e: one), the rate this step used
    grad_norms: list[float] = field(default_factory=list)  # per stage, the gradients' global norm before clipping
    # MoE families: each stage's router load-balancing loss (unweighted), by stage index; e2e: stage 0.
    router_aux_losses: dict[int, float] = field(default_factory=dict)

    def as_record(self) -> dict:
        record = {"step": self.step, "task_loss": self.task_loss, "tokens": self.tokens,
                  "step_seconds": self.seconds, "tokens_per_s": self.tokens / max(self.seconds, 1e-9)}
        record.update({f"recon_loss_{i}": v for i, v in enumerate(self.recon_losses)})
        record.update({f"router_aux_loss_{i}": v for i, v in sorted(self.router_aux_losses.items())})
        record.update({f"lr_{i}": v for i, v in enumerate(self.lrs)})
        record.update({f"grad_norm_{i}": v for i, v in enumerate(self.grad_norms)})
        return record


class _Trainable:
    """A module with its optimizer, schedule and clipping: one stage, or the whole model for e2e.

    Under bf16 the optimizer steps float32 masters (`precision.MasterWeights`) and the module keeps bf16
    parameters; under float32 it steps the module itself.
    """

    def __init__(self, module: nn.Module, lr: float, cfg: ExperimentConfig) -> None:
        self.module = module
        self.masters = MasterWeights(module) if run_dtype(cfg.train) == torch.bfloat16 else None
        self.optimizer = build_optimizer(self.weights, lr, cfg.train.weight_decay, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.grad_clip = cfg.train.grad_clip

    @property
    def weights(self) -> nn.Module:
        """The module whose values are the trained weights: the float32 masters under bf16."""
        return self.masters.master if self.masters is not None else self.module

    def after_backward(self) -> None:
        if self.masters is not None:
            self.masters.accumulate()

    def step(self) -> torch.Tensor:
        """Clip, step, advance the schedule; the gradients' global norm before clipping (left on the device)."""
        if self.masters is not None:
            norm = self.masters.step(self.optimizer, self.grad_clip)
        else:
            if self.grad_clip > 0:
                norm = nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
            else:
                norm = global_norm([p.grad for p in self.module.parameters() if p.grad is not None])
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm

    def weights_loaded(self) -> None:
        """After a checkpoint restored `weights` in place: under bf16, round the masters into the module."""
        if self.masters is not None:
            self.masters.copy_to_module()


class LocalTrainer:
    def __init__(self, cfg: ExperimentConfig, model: PreTrainedModel, batches, device: torch.device) -> None:
        self.cfg = cfg
        self.batches = batches  # anything with .get(micro_batch_index) -> dict of tensors
        self.device = device
        self.step = 0
        self.is_lopt = cfg.train.method == "lopt"
        if self.is_lopt:
            self.stages: list[Stage] = split_model(model, cfg.model.boundaries, cfg.train.lambda_aux, cfg.train.seed,
                                                   decoder_init=cfg.train.decoder_init, packed=cfg.data.packing)
            for stage in self.stages:
                apply_model_lora(stage, cfg.model, cfg.train.seed, stage.index)  # as the stage loader does
                stage.to(device).train()
            n = len(self.stages)
            self.trainables = [_Trainable(s, stage_lr(i, n, cfg.train), cfg) for i, s in enumerate(self.stages)]
        else:
            apply_model_lora(model, cfg.model, cfg.train.seed, None)
            self.model = model.to(device).train()
            self.router_coef = router_aux_loss_coef(model)
            self.trainables = [_Trainable(self.model, cfg.train.lr, cfg)]

    def train_step(self) -> StepResult:
        reset_peak(self.device)
        start = time.perf_counter()
        per_step = self.cfg.train.micro_batches_per_step
        # Losses and tokens are summed on the device and read once per step: a float() per micro-batch would
        # make the host wait for the GPU twice per micro-batch. float64 sums give what Python floats gave.
        losses = torch.zeros(len(self.trainables) if self.is_lopt else 1, dtype=torch.float64, device=self.device)
        tokens = torch.zeros((), dtype=torch.int64, device=self.device)
        router: dict[int, torch.Tensor] = {}  # MoE: each stage's router loss, summed likewise
        for j in range(per_step):
            batch = {k: v.to(self.device) for k, v in self.batches.get(self.step * per_step + j).items()}
            tokens += batch["attention_mask"].sum()
            metrics, micro_router = (self._lopt_micro if self.is_lopt else self._e2e_micro)(batch)
            losses += torch.stack(metrics).double() / per_step
            for i, value in micro_router.items():
                router[i] = router.get(i, 0.0) + value.double() / per_step
        lrs = [t.scheduler.get_last_lr()[0] for t in self.trainables]
        norms = torch.stack([t.step().to(self.device, torch.float64) for t in self.trainables])
        stages = sorted(router)
        flat = [losses, norms, tokens.double().reshape(1), *(router[i].reshape(1) for i in stages)]
        values = torch.cat(flat).tolist()  # the step's one host sync
        n = losses.numel()
        task, recon = values[n - 1], values[: n - 1]  # stage order: recon..., task
        grad_norms, total_tokens = values[n: 2 * n], values[2 * n]
        result = StepResult(self.step, task, recon, int(total_tokens), time.perf_counter() - start, lrs,
                            grad_norms, dict(zip(stages, values[2 * n + 1:])))
        self.step += 1
        return result

    def _lopt_micro(self, batch: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], dict[int, torch.Tensor]]:
        """Each stage's metric (reconstruction losses, then the task loss) and MoE router loss, detached."""
        # Each stage's graph is built, used and dropped before the next stage runs.
        per_step = self.cfg.train.micro_batches_per_step
        metrics, router = [], {}
        inputs = batch
        for stage, trainable in zip(self.stages, self.trainables):
            out = stage(inputs)
            (out.loss / per_step).backward()
            trainable.after_backward()
            metrics.append(out.metric.detach().float())
            if out.router_aux is not None:
                router[stage.index] = out.router_aux.detach().float()
            if stage.is_last:
                return metrics, router
            inputs = out.boundary
            del out
        raise AssertionError("unreachable: the last stage returns")

    def _e2e_micro(self, batch: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], dict[int, torch.Tensor]]:
        # MoE families: the family's own forward computes its router loss over all layers, as stages do per stage.
        moe = {"output_router_logits": True} if self.router_coef is not None else {}
        if self.cfg.data.packing:  # no padding mask: the family's mask helpers read the examples off the positions
            inputs = {"attention_mask": None, "position_ids": batch["position_ids"], "use_cache": False}
        else:
            inputs = {"attention_mask": batch["attention_mask"]}
        out = self.model(input_ids=batch["input_ids"], **inputs, **moe)
        task = causal_lm_loss(out.logits, batch["labels"])
        loss, router = task, {}
        if getattr(out, "aux_loss", None) is not None:
            loss = task + self.router_coef * out.aux_loss
            router[0] = out.aux_loss.detach().float()
        (loss / self.cfg.train.micro_batches_per_step).backward()
        self.trainables[0].after_backward()
        return [task.detach().float()], router

    @torch.no_grad()
    def evaluate(self, sets: list) -> dict[str, list[float]]:
        """Each stage's metric summed over each evaluation set's micro-batches (`lopt_dist/evaluation.py`), in eval
        mode and without gradients: the training state, RNG streams included, is left as it was."""
        modules = self.stages if self.is_lopt else [self.model]
        for module in modules:
            module.eval()
        sums = {}
        try:
            for eval_set in sets:
                totals = torch.zeros(len(modules), dtype=torch.float64, device=self.device)
                for i in range(self.cfg.eval.micro_batches):
                    batch = {k: v.to(self.device) for k, v in eval_set.batches.get(i).items()}
                    totals += torch.stack(self._eval_micro(batch)).double()
                sums[eval_set.name] = totals.tolist()
        finally:
            for module in modules:
                module.train()
        return sums

    def _eval_micro(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        if not self.is_lopt:
            return [causal_lm_loss(self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                   .logits, batch["labels"]).float()]
        metrics, inputs = [], batch
        for stage in self.stages:
            out = stage(inputs)
            metrics.append(out.metric.float())
            inputs = out.boundary
        return metrics

    def save_state(self, directory: Path) -> None:
        """Weights, optimizer and schedule of every stage, and the RNG states, into a staged checkpoint directory
        (layout: lopt_dist/checkpoint/local_state.py)."""
        for i, t in enumerate(self.trainables):
            hf_name = self.stages[i].hf_name if self.is_lopt else _same_name
            save_module_state(directory / f"stage_{i}", t.weights, t.optimizer, t.scheduler, hf_name)
        save_process_rng(directory, self.device)

    def load_state(self, directory: Path) -> None:
        for i, t in enumerate(self.trainables):
            load_module_state(directory / f"stage_{i}", t.weights, t.optimizer, t.scheduler)
            t.weights_loaded()
        load_process_rng(directory, self.device)
        self.step = json.loads((directory / "state.json").read_text())["step"]

    def memory(self) -> dict[str, int]:
        return memory_snapshot(self.device)

    def stage_weights(self) -> list[dict[str, torch.Tensor]]:
        """Weights for export, under the full model's names: the float32 master values under bf16."""
        return [t.weights.hf_state_dict() if self.is_lopt else merged_state_dict(t.weights, _same_name)
                for t in self.trainables]


def _same_name(key: str) -> str:
    return key  # e2e trains the whole model: its state-dict keys are the model's names
