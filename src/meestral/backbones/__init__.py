"""Backbone adapters: one per architecture family, one shared interface (base.Backbone)."""

from meestral.backbones.base import Backbone, LayerCost, Step
from meestral.backbones.loading import load_backbone, wrap

__all__ = ["Backbone", "LayerCost", "Step", "load_backbone", "wrap"]
