"""What each model family can run yet, asked before any weights load (no torch, no diffusers).

The story's own refusals live with the story (`story.family.family_refusals`: `validate` and
`--dry-run` report them when the family is known from a preset or folder); `keyframes.generate`
asks `refusal` as soon as the story's model is resolved (and again after a hub id's first load,
when its family is known only then), so a story with a feature FLUX.1 cannot run yet stops with
one line naming the field and the fix, before the slow load. (No command-line option is refused:
`--compile` runs on FLUX.1 as on SDXL.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from storycli.story.family import family_refusals
from storycli.story.loader import format_loc

if TYPE_CHECKING:
    from storycli.story.schema import Story


def refusal(family: str, story: Story) -> str | None:
    """The first of the story's settings a model `family` cannot run (yet), as one line naming
    the story field and the fix; None when it can run them all."""
    for loc, message in family_refusals(family, story)[:1]:
        return f"{format_loc(loc)}: {message}"
    return None
