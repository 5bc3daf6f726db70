"""Find the pieces of a Hugging Face decoder-only LM that a LoPT split needs.

Most causal-LM families (Llama, Qwen2/3, Mistral, Gemma, Phi-3, OLMo-2, ...) share one layout:
`<ForCausalLM>.model.{embed_tokens, layers, norm, rotary_emb}` and `<ForCausalLM>.lm_head`. We locate the
pieces by that layout and remember their qualified names, so that export can write a checkpoint with the
family's own parameter names.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


class ModelStructureError(ValueError):
    """The model does not have the layout a LoPT split needs."""


@dataclass
class DecoderParts:
    config: PretrainedConfig
    embed: nn.Embedding
    layers: nn.ModuleList
    norm: nn.Module
    head: nn.Linear
    rotary: nn.Module | None
    # Qualified names in the full model, e.g. "model.embed_tokens", "model.layers", "lm_head".
    embed_name: str
    layers_name: str
    norm_name: str
    head_name: str

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def find_parts(model: PreTrainedModel) -> DecoderParts:
    """Locate embedding, decoder layers, final norm, rotary embedding and LM head, or say what is missing."""
    cls = type(model).__name__
    prefix = getattr(model, "base_model_prefix", "model")
    base = getattr(model, prefix, None)
    if base is None or base is model:
        raise ModelStructureError(
            f"{cls} has no inner base model at `.{prefix}`; LoPT needs a *ForCausalLM model "
            "(load it with AutoModelForCausalLM), not a bare base model"
        )
    found = {
        "embed_tokens": getattr(base, "embed_tokens", None),
        "layers": getattr(base, "layers", None),
        "norm": getattr(base, "norm", None),
    }
    head = model.get_output_embeddings()
    missing = [f"{prefix}.{name}" for name, mod in found.items() if mod is None]
    if head is None:
        missing.append("lm_head (get_output_embeddings)")
    if missing:
        raise ModelStructureError(
            f"{cls} lacks {', '.join(missing)}. LoPT splits decoder-only LMs laid out as "
            f"`{prefix}.embed_tokens`, `{prefix}.layers` (a list of decoder layers), `{prefix}.norm` and an LM "
            "head (Llama, Qwen2/3, Mistral, Gemma, Phi-3, OLMo-2 ...); use such a model"
        )
    if not isinstance(found["layers"], nn.ModuleList) or len(found["layers"]) < 2:
        raise ModelStructureError(
            f"{cls}.{prefix}.layers must be a ModuleList of at least 2 decoder layers to be split"
        )
    head_name = next(name for name, mod in model.named_modules() if mod is head)
    return DecoderParts(
        config=model.config,
        embed=found["embed_tokens"],
        layers=found["layers"],
        norm=found["norm"],
        head=head,
        rotary=getattr(base, "rotary_emb", None),
        embed_name=f"{prefix}.embed_tokens",
        layers_name=f"{prefix}.layers",
        norm_name=f"{prefix}.norm",
        head_name=head_name,
    )


def layer_attention_types(config: PretrainedConfig) -> list[str]:
    """Each layer's attention kind, as the family's own forward decides it."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return list(layer_types)
    # Families without `layer_types` (Mistral, Phi-3) use sliding attention everywhere when a window is set.
    kind = "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"
    return [kind] * config.num_hidden_layers
