"""LoPT stages: a decoder-only LM cut at layer boundaries into modules that can live in different processes.

A stage runs a contiguous block of decoder layers. The first stage also owns the embedding, the last the
final norm and LM head; every stage but the last owns a reconstruction decoder and learns only from it.
What crosses a boundary is a plain dict of tensors (`BOUNDARY_KEYS`), always detached: the task loss can
never reach an earlier stage.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel

from lopt_dist.config import ConfigError
from lopt_dist.model.decoder import ReconstructionDecoder, reconstruction_loss
from lopt_dist.model.lora import merged_state_dict
from lopt_dist.model.parts import DecoderParts, find_parts

BOUNDARY_KEYS = ("hidden_states", "attention_mask", "position_ids", "labels")
IGNORE_INDEX = -100


class StageOutput(NamedTuple):
    # A tuple, so that DeepSpeed finds the loss among a forward's outputs and hooks its backward (a dataclass
    # hides it: BF16_Optimizer then never clears a micro-batch's gradients and counts them again).
    loss: torch.Tensor  # what this stage backpropagates: lambda_aux * reconstruction, or the task loss
    metric: torch.Tensor  # detached, for logging: unweighted reconstruction MSE, or task cross-entropy
    boundary: dict[str, torch.Tensor] | None  # detached input of the next stage (None for the last)
    # MoE families: this stage's routers' load-balancing loss, unweighted and detached (None without routers).
    # `loss` already holds router_aux_loss_coef times it.
    router_aux: torch.Tensor | None = None


def resolve_boundaries(boundaries: list[int] | None, num_layers: int) -> list[int]:
    """Default one boundary at the midpoint; check user boundaries against the model's depth."""
    if boundaries is None:
        return [num_layers // 2]
    bad = [b for b in boundaries if not 0 < b < num_layers]
    if bad:
        raise ConfigError(
            f"model.boundaries: {bad} outside the model's layers; the model has {num_layers} layers, so each "
            f"boundary must be between 1 and {num_layers - 1}"
        )
    return list(boundaries)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, mean over the micro-batch's supervised tokens."""
    shifted = labels[:, 1:].reshape(-1)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), shifted, ignore_index=IGNORE_INDEX)


class Stage(nn.Module):
    def __init__(
        self,
        parts: DecoderParts,
        index: int,
        layer_range: tuple[int, int],
        is_last: bool,
        lambda_aux: float,
        decoder_seed: int,
        decoder_init: str = "normal",
        packed: bool = False,
    ) -> None:
        super().__init__()
        self.config = parts.config
        self.index = index
        self.layer_range = layer_range
        self.is_first = index == 0
        self.is_last = is_last
        self.lambda_aux = lambda_aux
        # Packed batches (data.packing): several examples per row, told apart by position ids that restart at 0.
        # The family's mask helpers then get no padding mask, so that they build per-example causal masks from
        # the position ids; the 2D mask still says which tokens are real, for the losses.
        self.packed = packed
        self.names = (parts.embed_name, parts.layers_name, parts.norm_name, parts.head_name)
        start, end = layer_range
        self.layers = nn.ModuleList(parts.layers[start:end])
        self.glue = parts.glue
        self.layer_types = list(parts.glue.layer_kinds[start:end])
        # Rotary embeddings hold only buffers; each stage keeps its own copy to rebuild cos/sin locally
        # instead of sending them across the boundary.
        self.rotary = copy.deepcopy(parts.rotary) if parts.rotary is not None else None
        self.embed = parts.embed if self.is_first else None
        self.norm = parts.norm if is_last else None
        self.head = _untied_head(parts) if is_last else None
        self.decoder = None if is_last else ReconstructionDecoder(parts.config.hidden_size, decoder_seed, decoder_init)

    def forward(self, batch: dict[str, torch.Tensor]) -> StageOutput:
        if self.is_first:
            hidden = self.glue.embed(self.embed, batch["input_ids"])
            mask2d = batch["attention_mask"]
            if self.packed:  # restarting at each example; they travel to the next stages with the activations
                position_ids = batch["position_ids"]
            else:
                position_ids = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        else:
            hidden, mask2d, position_ids = batch["hidden_states"], batch["attention_mask"], batch["position_ids"]
        stage_input = hidden.detach()
        hidden, router_aux = self._run_layers_and_routers(hidden, mask2d, position_ids)
        # MoE: each stage balances its own routers, with the family's loss and coefficient, in its own objective.
        balance = self.glue.router_loss.coef * router_aux if router_aux is not None else 0.0
        aux = router_aux.detach() if router_aux is not None else None
        if self.is_last:
            logits = self.logits(hidden)
            task = causal_lm_loss(logits, batch["labels"])
            return StageOutput(loss=task + balance, metric=task.detach(), boundary=None, router_aux=aux)
        recon = reconstruction_loss(self.decoder(hidden), stage_input, mask2d)
        boundary = {
            "hidden_states": hidden.detach(),
            "attention_mask": mask2d,
            "position_ids": position_ids,
            "labels": batch["labels"],
        }
        return StageOutput(loss=self.lambda_aux * recon + balance, metric=recon.detach(), boundary=boundary,
                           router_aux=aux)

    def _run_layers_and_routers(self, hidden, mask2d, position_ids) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layers, and for MoE families the family's load-balancing loss over this stage's routers only."""
        router = self.glue.router_loss
        if router is None:
            return self.run_layers(hidden, mask2d, position_ids), None
        with router.capture(self.layers) as router_logits:
            hidden = self.run_layers(hidden, mask2d, position_ids)
        return hidden, router(router_logits, mask2d) if router_logits else None

    def run_layers(self, hidden: torch.Tensor, mask2d: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        masks = self.glue.masks(self.config, hidden, None if self.packed else mask2d, position_ids, self.layer_types)
        position_embeddings = self.glue.position_embeddings(self.rotary, hidden, position_ids, self.layer_types)
        for layer, kind in zip(self.layers, self.layer_types):
            out = layer(
                hidden,
                attention_mask=masks[kind],
                position_ids=position_ids,
                position_embeddings=position_embeddings[kind],
            )
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.glue.logits(self.head, self.norm(hidden))

    def hf_name(self, key: str) -> str | None:
        """The full model's name of this stage's state-dict entry `key`; None for what export drops (the decoder)."""
        embed_name, layers_name, norm_name, head_name = self.names
        attr, _, rest = key.partition(".")
        if attr == "layers":
            local, _, tail = rest.partition(".")
            return f"{layers_name}.{self.layer_range[0] + int(local)}.{tail}"
        prefix = {"embed": embed_name, "norm": norm_name, "head": head_name}.get(attr)
        return f"{prefix}.{rest}" if prefix is not None else None

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """This stage's weights under the full model's parameter names (decoder left out, LoRA adapters merged)."""
        return merged_state_dict(self, self.hf_name)


def _untied_head(parts: DecoderParts) -> nn.Linear:
    """The LM head with its own weight: with tied embeddings the head and embedding live in different stages."""
    head = parts.head
    if head.weight is parts.embed.weight:
        untied = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
        untied.to(dtype=head.weight.dtype, device=head.weight.device)
        with torch.no_grad():
            untied.weight.copy_(head.weight)
            if head.bias is not None:
                untied.bias.copy_(head.bias)
        return untied
    return head


def split_model(
    model: PreTrainedModel,
    boundaries: list[int] | None,
    lambda_aux: float,
    seed: int,
    only: int | None = None,
    decoder_init: str = "normal",
    packed: bool = False,
) -> list[Stage]:
    """Cut `model` into stages. With `only`, build just that stage (a worker keeps only its own).
    `decoder_init`: train.decoder_init; `packed`: the stages will get packed batches (data.packing)."""
    parts = find_parts(model)
    cuts = [0, *resolve_boundaries(boundaries, parts.num_layers), parts.num_layers]
    num_stages = len(cuts) - 1
    stages = []
    for i in range(num_stages):
        if only is not None and i != only:
            continue
        stages.append(
            Stage(
                parts,
                index=i,
                layer_range=(cuts[i], cuts[i + 1]),
                is_last=i == num_stages - 1,
                lambda_aux=lambda_aux,
                decoder_seed=seed * 1009 + i,
                decoder_init=decoder_init,
                packed=packed,
            )
        )
    return stages


def run_stages(stages: list[Stage], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Inference through all stages in order; returns the last stage's logits."""
    inputs = batch
    for stage in stages[:-1]:
        inputs = stage(inputs).boundary
    last = stages[-1]
    hidden = last.run_layers(inputs["hidden_states"], inputs["attention_mask"], inputs["position_ids"])
    return last.logits(hidden)
