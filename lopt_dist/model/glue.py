"""A family's glue around its decoder layers: read once from the model, applied by every stage.

A decoder-only LM is embed -> layers -> norm -> head, but each family's own forward adds a little around its
layers: Granite scales the embeddings and divides the logits, Cohere scales the logits, Gemma-2/3 soft-cap
them, Gemma-3 computes one rotary embedding per layer type, Llama-4 masks some layers in chunks, Qwen3-Next
hands its linear-attention layers a padding mask, MoE families add their routers' load-balancing loss. A
stage calls the layers itself, so it must redo that glue. All of it lives here, taken from the family's own
pieces where they exist (transformers' mask helper per layer type, the rotary module's own signature, the
family's loss function and the modules it records router logits from) and from a short table where the
family's forward does plain arithmetic. Whatever this cannot express is caught before start by the self-check
(selfcheck.py), which compares the split with the family's own forward.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.masking_utils import LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING, create_causal_mask

from lopt_dist.model.errors import ModelStructureError

# transformers 5.24 renamed the mask helpers' `past_key_values` argument to `cache`; pass whichever it takes.
_CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


@dataclass(frozen=True)
class _Scales:
    """Config attributes a family's forward multiplies or divides by, outside its layers."""

    embedding_multiplier: str | None = None  # inputs_embeds * config.<this>
    logits_divisor: str | None = None  # logits / config.<this>
    logits_multiplier: str | None = None  # logits * config.<this>


# Read from each family's modeling file (transformers 5.24); residual and attention multipliers sit inside the
# layers and need nothing here. A family missing from the table gets no scaling, and the self-check refuses it
# if it needed some.
_FAMILY_SCALES = {
    "granite": _Scales("embedding_multiplier", logits_divisor="logits_scaling"),
    "granitemoe": _Scales("embedding_multiplier", logits_divisor="logits_scaling"),
    "granitemoeshared": _Scales("embedding_multiplier", logits_divisor="logits_scaling"),
    "granite_swa": _Scales("embedding_multiplier", logits_divisor="logits_scaling"),
    "granitemoe_swa": _Scales("embedding_multiplier", logits_divisor="logits_scaling"),
    "hyperclovax": _Scales("embedding_multiplier", logits_multiplier="logits_scaling"),  # multiplies, unlike Granite
    "cohere": _Scales(logits_multiplier="logit_scale"),
    "cohere2": _Scales(logits_multiplier="logit_scale"),
    "cohere2_moe": _Scales(logits_multiplier="logit_scale"),
}


def layer_kinds(config: PretrainedConfig) -> list[str]:
    """Each layer's attention kind, by the rule transformers' own mask preparation follows."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return list(layer_types)
    # Families without `layer_types` (Mistral, Phi-3) use one kind everywhere, set by a window or chunk size.
    if getattr(config, "sliding_window", None) is not None:
        kind = "sliding_attention"
    elif getattr(config, "attention_chunk_size", None) is not None:
        kind = "chunked_attention"
    else:
        kind = "full_attention"
    return [kind] * config.num_hidden_layers


@dataclass(frozen=True)
class RouterLoss:
    """A MoE family's router load-balancing loss, as its *ForCausalLM adds it to the task loss."""

    function: Callable  # the family's own `load_balancing_loss_func(gate_logits, num_experts, top_k, mask)`
    num_experts: int
    top_k: int
    coef: float  # router_aux_loss_coef
    recorders: tuple[tuple[type, int], ...]  # (module class, output index) the family records router logits from

    @contextlib.contextmanager
    def capture(self, layers: nn.Module) -> Iterator[list[torch.Tensor]]:
        """Collect the router logits of the routers inside `layers` while the block runs."""
        logits: list[torch.Tensor] = []

        def record(index: int):
            def hook(module, args, output):
                value = output[index] if isinstance(output, tuple) else output
                if value is not None:
                    logits.append(value)
            return hook

        handles = []
        for module in layers.modules():
            index = next((i for cls, i in self.recorders if isinstance(module, cls)), None)
            if index is not None:
                handles.append(module.register_forward_hook(record(index)))
        try:
            yield logits
        finally:
            for handle in handles:
                handle.remove()

    def __call__(self, router_logits: list[torch.Tensor], attention_mask: torch.Tensor) -> torch.Tensor:
        """The unweighted loss over these routers only (multiply by `coef` for the objective)."""
        return self.function(tuple(router_logits), self.num_experts, self.top_k, attention_mask)


@dataclass(frozen=True)
class FamilyGlue:
    family: str  # the *ForCausalLM class name, for messages
    layer_kinds: tuple[str, ...]  # one per decoder layer of the full model
    mask_functions: Mapping[str, Callable] = field(repr=False)
    embedding_multiplier: float | None  # Granite: inputs_embeds * multiplier
    logits_divisor: float | None  # Granite: logits / divisor
    logits_multiplier: float | None  # Cohere: logits * multiplier
    logit_softcap: float | None
    rotary_by_layer_kind: bool  # Gemma-3: rotary(x, position_ids, layer_type), one table per kind
    router_loss: RouterLoss | None

    def embed(self, embedding: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = embedding(input_ids)
        if self.embedding_multiplier is not None:
            hidden = hidden * self.embedding_multiplier
        return hidden

    def position_embeddings(self, rotary: nn.Module | None, hidden: torch.Tensor, position_ids: torch.Tensor,
                            kinds: list[str]) -> dict[str, object]:
        if rotary is None:
            return dict.fromkeys(kinds)
        if self.rotary_by_layer_kind:
            return {kind: rotary(hidden, position_ids, kind) for kind in dict.fromkeys(kinds)}
        return dict.fromkeys(kinds, rotary(hidden, position_ids))

    def masks(self, config: PretrainedConfig, hidden: torch.Tensor, mask2d: torch.Tensor,
              position_ids: torch.Tensor, kinds: list[str]) -> dict[str, object]:
        """transformers' own mask helper for each kind, so its kernel, padding, window and chunk rules apply."""
        kwargs = dict(config=config, inputs_embeds=hidden, attention_mask=mask2d, position_ids=position_ids,
                      **{_CACHE_ARG: None})
        return {kind: self.mask_functions[kind](**kwargs) for kind in dict.fromkeys(kinds)}

    def logits(self, head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        logits = head(hidden)
        if self.logits_divisor is not None:
            logits = logits / self.logits_divisor
        if self.logits_multiplier is not None:
            logits = logits * self.logits_multiplier
        if self.logit_softcap is not None:  # Gemma-2/3 style families
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits


def read_glue(model: PreTrainedModel, base: nn.Module) -> FamilyGlue:
    """The glue of `model`'s family, or a ModelStructureError naming what a stage cannot reproduce."""
    config = model.config
    family = type(model).__name__
    kinds = layer_kinds(config)
    scales = _FAMILY_SCALES.get(config.model_type, _Scales())

    def value(name: str | None) -> float | None:
        return None if name is None else float(getattr(config, name))

    rotary = getattr(base, "rotary_emb", None)
    return FamilyGlue(
        family=family,
        layer_kinds=tuple(kinds),
        mask_functions={kind: _mask_function(kind, family) for kind in dict.fromkeys(kinds)},
        embedding_multiplier=value(scales.embedding_multiplier),
        logits_divisor=value(scales.logits_divisor),
        logits_multiplier=value(scales.logits_multiplier),
        logit_softcap=getattr(config, "final_logit_softcapping", None),
        rotary_by_layer_kind=rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters,
        router_loss=family_router_loss(model, base),
    )


def _mask_function(kind: str, family: str) -> Callable:
    function = LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING.get(kind)
    if function is None or isinstance(function, Mapping):
        supported = sorted(k for k, v in LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING.items() if not isinstance(v, Mapping))
        raise ModelStructureError(
            f"{family} has layers of type {kind!r}, which need more than one transformers mask helper "
            f"(or none), so a LoPT stage cannot prepare their inputs; LoPT splits families whose layers are of the "
            f"types {supported}. Train this family end to end (runtime.mode=local, train.method=e2e)"
        )
    return function


def _recordable(base: nn.Module) -> dict:
    """What the base model records through output hooks (a property from transformers 5; the attribute before)."""
    return getattr(base, "can_record_outputs", None) or getattr(type(base), "_can_record_outputs", None) or {}


def router_aux_loss_coef(model: PreTrainedModel) -> float | None:
    """`router_aux_loss_coef` if `model`'s *ForCausalLM adds a router load-balancing loss, else None.

    MoE families in transformers all follow one pattern: the *ForCausalLM keeps `num_experts`,
    `num_experts_per_tok` and `router_aux_loss_coef`, and its module defines `load_balancing_loss_func`.
    """
    function = getattr(sys.modules.get(type(model).__module__), "load_balancing_loss_func", None)
    needed = ("num_experts", "num_experts_per_tok", "router_aux_loss_coef")
    if function is None or not all(hasattr(model, n) for n in needed):
        return None
    return float(model.router_aux_loss_coef)


def family_router_loss(model: PreTrainedModel, base: nn.Module) -> RouterLoss | None:
    """The router loss `model`'s family adds, computed over the routers a stage holds; None if it adds none.

    The routers are the modules the base model declares it records router logits from
    (`can_record_outputs["router_logits"]`), with the output index it records.
    """
    coef = router_aux_loss_coef(model)
    specs = _recordable(base).get("router_logits")
    if coef is None or specs is None:
        return None
    recorders = []
    for spec in specs if isinstance(specs, list) else [specs]:
        # A bare class records output index 1 (transformers' default for keys other than hidden states).
        target, index = (spec, 1) if isinstance(spec, type) else (getattr(spec, "target_class", None), spec.index)
        if target is None or getattr(spec, "layer_name", None):
            raise ModelStructureError(
                f"{type(model).__name__} records its router logits by module name, which a LoPT stage cannot "
                "follow; train this family end to end (runtime.mode=local, train.method=e2e)"
            )
        recorders.append((target, index))
    function = sys.modules[type(model).__module__].load_balancing_loss_func
    return RouterLoss(function, int(model.num_experts), int(model.num_experts_per_tok), coef, tuple(recorders))
