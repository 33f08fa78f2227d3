"""What each model family can run yet, asked before any weights load (no torch, no diffusers).

`keyframes.generate` asks `refusal` as soon as the story's model is resolved (and again after a
hub id's first load, when its family is known only then), so a story with a feature FLUX.1
cannot run yet stops with one line naming the story field and the fix, before the slow load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from storycli.story.schema import Story

_SDXL_INSTEAD = "or use an SDXL model (e.g. `model: sdxl`)"


def flux_refusal(story: Story, compile_: bool = False) -> str | None:
    """The first of the story's features FLUX.1 cannot run yet, as one line naming the story
    field and the fix; None when it can run."""
    if story.photos():
        return (
            "ip_adapter: IP-Adapter photos are not supported on FLUX.1 yet; remove "
            f"`ip_adapter:` {_SDXL_INSTEAD}"
        )
    if story.uses_one_prompt:
        return (
            "consistency.method: one-prompt (1Prompt1Story) is not supported on FLUX.1 yet; "
            f"use `method: none` {_SDXL_INSTEAD}"
        )
    if story.freeu is not None:
        return "freeu: FreeU is a UNet feature, not FLUX.1's; remove `freeu:` from the story"
    if story.uses_csa and story.consistency.mode == "window":
        return (
            "consistency.mode: window is not supported on FLUX.1 yet; use `mode: reference` "
            + _SDXL_INSTEAD
        )
    if compile_:
        return "--compile is not supported on FLUX.1 yet; run without --compile"
    return None


def refusal(family: str, story: Story, compile_: bool = False) -> str | None:
    """One line naming the story field (and the fix) a model `family` cannot run yet, or None
    (SDXL runs everything)."""
    return flux_refusal(story, compile_) if family == "flux" else None
