"""Attention-side consistency methods. Nothing here knows about files or the CLI."""

from .csa import ConsistentSelfAttnProcessor, CSAState, LayerInfo, csa_layers, installed_csa

__all__ = ["CSAState", "ConsistentSelfAttnProcessor", "LayerInfo", "csa_layers", "installed_csa"]
