"""Which `Backbone` runs a loaded pipeline: FLUX.1's for a `FluxPipeline`, SDXL's otherwise.

The loop asks for its backbone here rather than naming one, so a second model family is one
branch, not a second loop. (What a family cannot run yet is `support.py`'s, asked before any
weights load.)
"""

from __future__ import annotations

from typing import Any

from storycli.keyframes.backbones.base import Backbone
from storycli.keyframes.backbones.flux import FluxBackbone
from storycli.keyframes.backbones.sdxl import SDXLBackbone

#: The pipeline classes FLUX.1's backbone runs (by name: a subclass of the pipeline counts).
FLUX_PIPELINES = ("FluxPipeline",)


def is_flux(pipe: Any) -> bool:
    """Whether `pipe` is a FLUX.1 text-to-image pipeline."""
    return any(cls.__name__ in FLUX_PIPELINES for cls in type(pipe).__mro__)


def backbone_for(pipe: Any) -> Backbone:
    """The backbone the story loop drives `pipe` through."""
    if is_flux(pipe):
        return FluxBackbone(pipe)
    return SDXLBackbone(pipe)
