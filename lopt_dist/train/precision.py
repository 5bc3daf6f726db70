"""The one mixed-precision policy of every training path, and how each path applies it.

`train.dtype: float32` trains everything in float32. `train.dtype: bfloat16` means, on every path:
- parameters and compute in bf16 (the model is loaded in bf16; buffers such as rotary tables stay float32);
- float32 master weights, which AdamW updates (its state is float32 too);
- the loss is scaled by 1 / micro-batches before each backward, and each micro-batch's bf16 gradients are
  added into float32 accumulators;
- at the step: the accumulated gradients' global norm is clipped, AdamW steps the masters, and the masters
  are copied (rounded to bf16) back into the parameters; a step whose gradient norm is not finite is skipped;
- bf16 on the wire: boundary activations and DeepSpeed's gradient reductions travel in bf16.

DeepSpeed gets it from `deepspeed_precision` (its bf16 mode with float32 `grad_accum_dtype`); the single-process
trainer from `MasterWeights`, which follows the order of operations of DeepSpeed's BF16_Optimizer, so that a
pipeline run and a single-process run make the same updates up to bf16 rounding (tests/pipeline/test_big_models.py).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lopt_dist.config import ConfigError, TrainConfig

# DeepSpeed's clipping adds this to the norm before dividing (runtime/utils.py: clip_tensors_by_global_norm).
_CLIP_EPS = 1e-6


def run_dtype(train: TrainConfig) -> torch.dtype:
    """The dtype parameters live and compute in."""
    return torch.bfloat16 if train.dtype == "bfloat16" else torch.float32


def cast_parameters(module: nn.Module, dtype: torch.dtype) -> None:
    """Parameters to `dtype`, buffers untouched (rotary tables stay float32, as DeepSpeed keeps them)."""
    for param in module.parameters():
        if param.dtype != dtype:
            param.data = param.data.to(dtype)


# ------------------------------------------------------------------------------------------ DeepSpeed


def deepspeed_precision(ds: dict[str, Any], train: TrainConfig, where: str) -> dict[str, Any]:
    """Complete a group's DeepSpeed config with the policy. `where` names the JSON in messages."""
    if ds.get("fp16", {}).get("enabled", False) not in (False, "auto"):
        raise ConfigError(f"{where} enables fp16; use train.dtype=bfloat16 or float32")
    if "fp16" in ds:  # "auto" (as HF Trainer JSONs write it) means off here: train.dtype decides
        ds["fp16"] = {**ds["fp16"], "enabled": False}
    bf16 = train.dtype == "bfloat16"
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
    if not bf16:
        return ds
    ds["data_types"] = {**ds.get("data_types", {}), "grad_accum_dtype": "fp32"}
    zero = ds.get("zero_optimization", {})
    if zero.get("stage", 0) == 0:
        # Without ZeRO, DeepSpeed accumulates bf16 gradients in bf16 only: engine._do_optimizer_sanity_check
        # refuses a bf16 model with float32 `grad_accum_dtype` (NotImplementedError). ZeRO-1 with that pair runs
        # BF16_Optimizer: float32 masters, float32 accumulation, the same updates. On one worker it shards
        # nothing; on several it shards only the optimizer state, which every worker would otherwise repeat.
        ds["zero_optimization"] = {**zero, "stage": 1}
    return ds


def refuse_policy_contradictions(ds: dict[str, Any], where: str) -> None:
    """A bf16 run's JSON may not ask for a precision other than the policy's (checked before start)."""
    accum = ds.get("data_types", {}).get("grad_accum_dtype")
    if accum not in (None, "fp32"):
        raise ConfigError(f"{where} sets data_types.grad_accum_dtype={accum!r}, but train.dtype=bfloat16 "
                          "accumulates gradients in fp32 on every path; remove it")
    for name in ("bf16_master_weights_and_grads", "bf16_optimizer_states"):
        if ds.get("bf16", {}).get(name):
            raise ConfigError(f"{where} sets bf16.{name}, but train.dtype=bfloat16 keeps fp32 master weights and "
                              "optimizer state on every path; remove it")


# ------------------------------------------------------------------------------------------ single process


class MasterWeights:
    """float32 masters of a bf16 module, with DeepSpeed BF16_Optimizer's order of operations.

    `master` is a float32 copy of the module (same structure, so the optimizer's parameter groups and the
    export names come out exactly as for the module); its `.grad`s are the float32 accumulators.
    """

    def __init__(self, module: nn.Module) -> None:
        cast_parameters(module, torch.bfloat16)
        self.module = module
        self.master = copy.deepcopy(module).float()  # masters start from the bf16 values, as DeepSpeed's do
        self.pairs = list(zip(module.parameters(), self.master.parameters(), strict=True))

    @torch.no_grad()
    def accumulate(self) -> None:
        """After a micro-batch's backward: add its bf16 gradients into the float32 accumulators."""
        for param, master in self.pairs:
            if param.grad is None:
                continue
            if master.grad is None:
                master.grad = torch.zeros_like(master)
            master.grad.add_(param.grad.to(torch.float32))
            param.grad = None

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
        """Clip the accumulated gradients, step the masters, round them back into the bf16 parameters. Returns the
        gradients' global norm before clipping (as DeepSpeed reports it)."""
        grads = [m.grad for _, m in self.pairs if m.grad is not None]
        norm = global_norm(grads)
        if bool(torch.isfinite(norm)):  # DeepSpeed skips the step (and drops the gradients) otherwise
            if max_norm > 0:
                coef = max_norm / (norm + _CLIP_EPS)  # float32 arithmetic, as DeepSpeed's
                if coef < 1:
                    for grad in grads:
                        grad.mul_(coef)
            for _, master in self.pairs:
                if master.grad is None:  # DeepSpeed's flat buffer gives every parameter a (zero) gradient
                    master.grad = torch.zeros_like(master)
            optimizer.step()
            for param, master in self.pairs:
                param.copy_(master)
        for _, master in self.pairs:
            master.grad = None
        return norm

    @torch.no_grad()
    def copy_to_module(self) -> None:
        """Round the masters into the bf16 parameters (after a checkpoint restored the masters)."""
        for param, master in self.pairs:
            param.copy_(master)


def global_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The gradients' 2-norm, as DeepSpeed's get_global_norm_of_tensors: per-tensor norms, squares summed, root."""
    if not grads:
        return torch.zeros(())
    return torch.stack([g.detach().float().norm(2) for g in grads]).pow(2).sum().pow(0.5)
