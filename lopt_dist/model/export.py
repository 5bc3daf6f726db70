"""Rejoining trained stages into a Hugging Face model lives in the checkpoint component; kept importable here."""

from lopt_dist.checkpoint.export import export_model

__all__ = ["export_model"]
