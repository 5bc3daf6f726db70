"""LoRA adapters on a stage (the `peft` library), and merging them back into plain weights for export.

`model.lora` lists which stages get adapters. Such a stage trains only its adapters and, if it has one, its
reconstruction decoder (always trained in full); its own weights are frozen, so the optimizer holds the adapters
and the decoder only. Adapters are injected into an already materialised stage (`apply_lora`), in place: each
targeted `nn.Linear` at path P becomes a peft LoRA layer whose frozen weight is `P.base_layer.weight` and whose
adapters are `P.lora_A.default.weight` (r x in) and `P.lora_B.default.weight` (out x r). A starts from a seeded
generator of its own and B at zero, so every process that builds the stage builds the same adapters, and the
adapted stage starts as exactly the base stage.

The export writes the model under its original names with the adapters merged: P.weight = base + scaling * B @ A
(`LoraLayout` says which state-dict entries are adapters, which are renamed bases, and the merge of each).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lopt_dist.config import ConfigError, LoraConfig, ModelConfig
from lopt_dist.model.decoder import ReconstructionDecoder

ADAPTER = "default"  # peft's name of the one adapter each layer holds
_BASE = ".base_layer."


def lora_entry(model: ModelConfig, stage_index: int | None) -> LoraConfig | None:
    """The `model.lora` entry that covers stage `stage_index` (None: the whole model, for e2e), if any."""
    for entry in model.lora:
        if entry.stages is None or (stage_index is not None and stage_index in entry.stages):
            return entry
    return None


def adapter_seed(seed: int, stage_index: int | None) -> int:
    """The seed of a stage's adapters (stage None: the whole model), apart from the decoders' seeds."""
    return seed * 7919 + 100_003 + (stage_index or 0)


def apply_model_lora(module: nn.Module, model: ModelConfig, seed: int, stage_index: int | None) -> None:
    """Adapters on stage `stage_index` (None: the whole e2e model) if `model.lora` lists it."""
    entry = lora_entry(model, stage_index)
    if entry is not None:
        where = "the model" if stage_index is None else f"stage {stage_index}"
        apply_lora(module, entry, adapter_seed(seed, stage_index), where)


def apply_lora(module: nn.Module, entry: LoraConfig, seed: int, where: str) -> None:
    """Inject `entry`'s adapters into `module` in place, freeze the rest (a `decoder` child stays trainable)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    config = PeftLoraConfig(r=entry.rank, lora_alpha=entry.alpha, lora_dropout=entry.dropout,
                            target_modules=list(entry.target_modules), bias="none")
    try:
        inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    except ValueError as err:
        if "not found in the base model" not in str(err):
            raise
        raise ConfigError(no_targets_message(entry, module, where)) from None
    _seeded_adapters(module, seed)
    decoder = getattr(module, "decoder", None)
    if isinstance(decoder, ReconstructionDecoder):  # peft froze all but the adapters; the decoder learns in full
        decoder.requires_grad_(True)


def _seeded_adapters(module: nn.Module, seed: int) -> None:
    """A as peft starts it (kaiming-uniform, a = sqrt(5)) but from our own generator, B zero; in the base dtype."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in sorted(adapted_layers(module).items()):
            base = layer.get_base_layer().weight
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            start = nn.init.kaiming_uniform_(torch.empty(a.shape), a=math.sqrt(5), generator=gen)
            layer.lora_A[ADAPTER].weight = nn.Parameter(start.to(base.dtype).to(base.device))
            layer.lora_B[ADAPTER].weight = nn.Parameter(torch.zeros(b.shape, dtype=base.dtype, device=base.device))


def adapted_layers(module: nn.Module) -> dict[str, nn.Module]:
    """peft LoRA layers inside `module`, by their path."""
    if not any(".lora_A." in name for name, _ in module.named_parameters()):
        return {}  # not adapted: no need to import peft
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def linear_names(module: nn.Module) -> list[str]:
    """The last part of the name of every nn.Linear inside `module`: what target_modules may list."""
    return sorted({name.rpartition(".")[2] for name, m in module.named_modules() if isinstance(m, nn.Linear)})


def no_targets_message(entry: LoraConfig, module: nn.Module, where: str) -> str:
    return (f"model.lora: target_modules {entry.target_modules} name no linear module of {where}, whose linear "
            f"modules are named {linear_names(module)}: list some of these")


def check_targets(model: ModelConfig, layers: nn.Module, where: str) -> None:
    """Before start, on the model's skeleton: every entry names at least one linear module of the decoder layers."""
    names = set(linear_names(layers))
    for entry in model.lora:
        if not names & set(entry.target_modules):
            raise ConfigError(no_targets_message(entry, layers, where))


# ------------------------------------------------------------------------------------------------- export


@dataclass(frozen=True)
class LoraDelta:
    """What a LoRA layer adds to its base weight: scaling * B @ A, with A and B named by state-dict key."""

    a_key: str
    a_shape: tuple[int, ...]
    b_key: str
    b_shape: tuple[int, ...]
    scaling: float

    def merge(self, base: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The merged weight, in float32 (the export casts it)."""
        a, b = a.to(base.device, torch.float32), b.to(base.device, torch.float32)
        return base.float() + self.scaling * (b @ a)


class LoraLayout:
    """Which state-dict keys of a (possibly adapted) module are adapters, renamed bases, and merges."""

    def __init__(self, module: nn.Module) -> None:
        self.adapters: set[str] = set()
        self.deltas: dict[str, LoraDelta] = {}
        self.paths: list[str] = []
        for path, layer in adapted_layers(module).items():
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            a_key, b_key = f"{path}.lora_A.{ADAPTER}.weight", f"{path}.lora_B.{ADAPTER}.weight"
            self.adapters |= {a_key, b_key}
            self.paths.append(path)
            self.deltas[f"{path}.base_layer.weight"] = LoraDelta(
                a_key, tuple(getattr(a, "ds_shape", a.shape)), b_key, tuple(getattr(b, "ds_shape", b.shape)),
                float(layer.scaling[ADAPTER]))

    def is_adapter(self, key: str) -> bool:
        return key in self.adapters

    def plain_key(self, key: str) -> str:
        """The key the entry had before the adapters were injected (`P.base_layer.weight` -> `P.weight`)."""
        return key.replace(_BASE, ".") if _BASE in key else key

    def delta(self, key: str) -> LoraDelta | None:
        return self.deltas.get(key)


def merged_state_dict(module: nn.Module, hf_name: Callable[[str], str | None]) -> dict[str, torch.Tensor]:
    """`module`'s exported entries under `hf_name`, adapters merged (an unadapted module: its state dict)."""
    layout = LoraLayout(module)
    state = module.state_dict()
    out = {}
    for key, value in state.items():
        if layout.is_adapter(key):
            continue
        name = hf_name(layout.plain_key(key))
        if name is None:
            continue
        delta = layout.delta(key)
        out[name] = value if delta is None else delta.merge(value, state[delta.a_key], state[delta.b_key])
    return out
