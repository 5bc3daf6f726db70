"""Errors a user's model can cause when it is cut into stages."""

from __future__ import annotations


class ModelStructureError(ValueError):
    """The model does not have the layout or the family glue a LoPT split needs."""
