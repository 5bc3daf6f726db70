"""Find the pieces of a Hugging Face decoder-only LM that a LoPT split needs.

Most causal-LM families (Llama, Qwen2/3, Mistral, Gemma, Phi-3, OLMo-2, ...) share one layout:
`<ForCausalLM>.<base>.{embed_tokens, layers, norm, rotary_emb}` and `<ForCausalLM>.lm_head`. We locate the
pieces by that layout and remember their qualified names, so that export can write a checkpoint with the
family's own parameter names; what the family's forward does around them is its glue (glue.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from lopt_dist.model.errors import ModelStructureError
from lopt_dist.model.glue import FamilyGlue, read_glue

__all__ = ["DecoderParts", "ModelStructureError", "find_base", "find_parts"]


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
    glue: FamilyGlue

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def find_base(model: PreTrainedModel) -> tuple[str, nn.Module]:
    """(attribute name, module) of the base model inside a *ForCausalLM.

    `base_model_prefix` names it for most families; where the class inherits a prefix that is not its own
    (Llama-4's text *ForCausalLM says `language_model` but keeps its base at `.model`), the base is the one
    child that is itself a pretrained model.
    """
    cls = type(model).__name__
    prefix = getattr(model, "base_model_prefix", "model")
    base = getattr(model, prefix, None)
    if isinstance(base, nn.Module) and base is not model:
        return prefix, base
    children = [(name, child) for name, child in model.named_children() if isinstance(child, PreTrainedModel)]
    if len(children) == 1:
        return children[0]
    raise ModelStructureError(
        f"{cls} has no inner base model (nothing at `.{prefix}`, its base_model_prefix, and "
        f"{len(children)} pretrained-model children); LoPT needs a *ForCausalLM model (load it with "
        "AutoModelForCausalLM), not a bare base model"
    )


def find_parts(model: PreTrainedModel) -> DecoderParts:
    """Locate embedding, decoder layers, final norm, rotary embedding and LM head, or say what is missing."""
    cls = type(model).__name__
    prefix, base = find_base(model)
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
            "head (Llama, Qwen, Mistral, Gemma, Granite, Cohere, ...: the README's model families); use such a model"
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
        glue=read_glue(model, base),
    )
