"""Cutting a Hugging Face causal LM into LoPT stages, and joining them back."""

from lopt_dist.model.export import export_model
from lopt_dist.model.parts import DecoderParts, ModelStructureError, find_parts
from lopt_dist.model.stages import BOUNDARY_KEYS, Stage, StageOutput, causal_lm_loss, run_stages, split_model

__all__ = [
    "BOUNDARY_KEYS", "DecoderParts", "ModelStructureError", "Stage", "StageOutput", "causal_lm_loss",
    "export_model", "find_parts", "run_stages", "split_model",
]
