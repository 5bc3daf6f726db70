"""Which checkpoint tensors make which of the model's tensors, planned from the checkpoint's names alone.

transformers 5 loads some families from other names and layouts than they have in memory: `save_pretrained`
writes Mixtral's experts one matrix per expert under `block_sparse_moe`, and `from_pretrained` renames them and
stacks them into `mlp.experts.gate_up_proj` (its `conversion_mapping.py`). A stage worker must do the same for
its own tensors and read no others. `KeyPlan` runs transformers' own key renaming over the checkpoint's names
(from the index or the file headers: no weight is read) and records, for every tensor of the model, the
checkpoint keys that make it and the transformers converter that combines them; `make` applies that
converter's own operations to the tensors read. Checkpoints already in the in-memory layout (lopt-dist's own
exports) plan to one key per tensor.

The stage loader fills one unit (the embedding, one decoder layer, the final norm, the head) at a time. A
conversion that makes tensors of two units at once (say a fused tensor split over two layers) cannot be loaded
that way and is refused when the plan is made, before any worker reads a weight. transformers 4 has no
conversion mapping: there every tensor is its own checkpoint key.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from lopt_dist.config import ConfigError
from lopt_dist.model.parts import find_parts

_LOCAL_ONLY = "train it with runtime.mode=local (a full from_pretrained per process)"


@dataclass
class Source:
    """Checkpoint tensors and how they become model tensors: copied (no converter) or converted together."""

    keys: list[str]  # checkpoint names, in the order the conversion takes them
    targets: list[str]  # model names made from them; the first names the conversion
    converter: Any = None  # a transformers WeightConverter (a template: `make` converts with a copy)
    patterns: list[str] = field(default_factory=list)  # the converter's source pattern each key matched


class KeyPlan:
    """For every tensor of `model` (a skeleton: parameters may be on the meta device), its checkpoint `Source`."""

    def __init__(self, model: PreTrainedModel, checkpoint_keys: Iterable[str], where: str) -> None:
        self.model = model
        self.where = where
        parts = find_parts(model)
        self._layers = parts.layers_name
        self._whole_units = (parts.embed_name, parts.norm_name, parts.head_name)
        known = model.state_dict()
        self._by_target: dict[str, tuple[Source, str]] = {}
        for source in _plan_sources(model, checkpoint_keys, known):
            for target in source.targets:
                self._by_target[target] = (source, target)
        embed, head = f"{parts.embed_name}.weight", f"{parts.head_name}.weight"
        tied = getattr(model.config, "tie_word_embeddings", False)
        if tied and head not in self._by_target and embed in self._by_target:
            # Checkpoints of tied models usually store only the embedding; the untied head starts as its copy.
            self._by_target[head] = self._by_target[embed]
        self._refuse_sources_across_units(known)
        self._refuse_missing(model)

    def source(self, name: str) -> tuple[Source, str]:
        """The source of model tensor `name`, and the name of the tensor it makes that `name` takes."""
        if name not in self._by_target:
            raise ConfigError(f"model.name: {self.where} has no tensor {name!r} (nor tensors that transformers "
                              "converts into it), which the model's layout needs; the checkpoint does not match its "
                              "config.json (re-save it with save_pretrained)")
        return self._by_target[name]

    def has(self, name: str) -> bool:
        return name in self._by_target

    def make(self, source: Source, read: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
        """Read `source`'s checkpoint tensors with `read` and convert them: model name -> tensor."""
        if source.converter is None:
            return {source.targets[0]: read(source.keys[0])}
        converter = copy.deepcopy(source.converter)
        first = source.targets[0]
        for key, pattern in zip(source.keys, source.patterns, strict=True):
            converter.add_tensor(first, key, pattern, read(key))
        made = converter.convert(first, model=self.model, config=self.model.config)
        made = {name: value[0] if isinstance(value, list) else value for name, value in made.items()}
        if set(made) != set(source.targets):
            raise ConfigError(f"model.name: {self.where}: transformers' conversion of {_few(source.keys)} made "
                              f"{sorted(made)} where the plan expected {source.targets}; lopt-dist cannot load this "
                              f"family's checkpoint stage by stage: {_LOCAL_ONLY}")
        return made

    def unit_of(self, name: str) -> str | None:
        """The unit (embedding, `layers.i`, final norm, head) model tensor `name` belongs to, None if none."""
        for unit in self._whole_units:
            if name.startswith(f"{unit}."):
                return unit
        if name.startswith(f"{self._layers}."):
            return f"{self._layers}.{name[len(self._layers) + 1:].split('.', 1)[0]}"
        return None

    def _refuse_sources_across_units(self, known: dict) -> None:
        for source, _ in self._by_target.values():
            units = {self.unit_of(target) or "outside the stages" for target in source.targets if target in known}
            if len(units) > 1:
                raise ConfigError(
                    f"model.name: {self.where}: transformers makes {source.targets} ({', '.join(sorted(units))}) "
                    f"together from checkpoint tensors {_few(source.keys)}, so no stage can load its own part alone; "
                    f"{_LOCAL_ONLY}, or save the model with its in-memory tensor names")

    def _refuse_missing(self, model: PreTrainedModel) -> None:
        for unit in (*self._whole_units, self._layers):
            for name, _ in model.get_submodule(unit).named_parameters(prefix=unit):
                self.source(name)


def plan_checkpoint(location: str, checkpoint_keys: Iterable[str]) -> KeyPlan:
    """The plan of the checkpoint at `location` for its own config, on a meta-device model (no memory)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(location))
    return KeyPlan(model, checkpoint_keys, location)


def _plan_sources(model: PreTrainedModel, keys: Iterable[str], known: dict) -> list[Source]:
    """Each checkpoint key renamed as `from_pretrained` renames it (renamings, then at most one converter),
    grouped by the model tensor it makes; keys the model has no tensor for are left out, as transformers does."""
    tools = _conversion_tools()
    if tools is None:  # transformers 4: checkpoints hold the in-memory names
        return [Source([key], [key]) for key in keys if key in known]
    mapping_for, renaming_cls, converter_cls, natural_order, rename = tools
    transforms = mapping_for(model)
    renamings = [t for t in transforms if isinstance(t, renaming_cls)]
    converters = [t for t in transforms if isinstance(t, converter_cls)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    prefix = model.base_model_prefix
    sources: dict[str, Source] = {}
    # In transformers' order: a converter stacks its tensors (experts 0, 1, ..., 10) in the order it sees them.
    for key in sorted(keys, key=natural_order):
        target, pattern = rename(key, renamings, converters, prefix, known)
        if target not in known and key in known:  # a key that should not have been renamed
            target, pattern = rename(key, [], [], prefix, known)
        if target not in known:
            continue
        if pattern is None:
            sources.setdefault(target, Source([key], [target]))
            continue
        converter = by_pattern[pattern]
        # A one-to-many converter names its first target; transformers derives the others by the same substitution.
        targets = [target.replace(converter.target_patterns[0], t) for t in converter.target_patterns]
        source = sources.setdefault(target, Source([], targets, converter))
        if source.converter is converter:
            source.keys.append(key)
            source.patterns.append(pattern)
    return list(sources.values())


def _conversion_tools():
    """transformers' conversion entry points, or None where it has none (transformers 4)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )
    except ImportError:
        return None
    return get_model_conversion_mapping, WeightRenaming, WeightConverter, dot_natural_key, rename_source_key


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
