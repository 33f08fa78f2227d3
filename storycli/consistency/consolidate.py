"""1Prompt1Story's prompt consolidation, planned (pure Python: `--dry-run` shows it).

Every frame that shows the story's character(s) is encoded from one prompt holding the identity
P0 and frame texts, inside the style's template, as the official code (`utils.py`,
`movement_gen_story_slide_windows`) builds it:

- when every frame fits (at most `max_frames` of them, and "P0 P_1 … P_N" within the budget),
  every frame encodes that one prompt, in story order, and expresses its own P_j in it;
- otherwise each frame encodes a circular window starting at itself, "P0 P_j P_j+1 …" (mod N),
  as long as fits and at most `max_frames`, and expresses its first part.

The budget is the text encoder's 77 tokens, counted in tokens with the CLIP tokenizer (not in
words as the official code counts, so nothing is ever cut). The frame's own embedding is then
reweighted to express its part and suppress the others (`one_prompt.py`). Frames whose texts are
equal (tags removed) express the first of those parts in the shared prompt, as the official code
(which finds a text's tokens by their first occurrence) does, so a frame's prompt and own text
decide what it expresses.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from storycli.story.schema import NO_CHARACTER_TAG, TAG_RE, Story, frame_tags
from storycli.story.tokens import CONTENT_TOKENS, count_tokens

TEMPLATE_SLOT = "{prompt}"


@dataclass(frozen=True)
class Consolidated:
    """One frame's consolidated prompt and the pieces it is made of, in order: the style's
    prefix, the identity, the frame texts (story order when all fit, else the window from this
    frame), the style's suffix."""

    prefix: str
    identity: str
    parts: tuple[str, ...]
    suffix: str
    frames: tuple[int, ...]  # the story frames of `parts`
    express: int = 0  # which of `parts` this frame expresses (the others are suppressed)

    @property
    def prompt(self) -> str:
        return self.prefix + " ".join((self.identity, *self.parts)) + self.suffix

    def cumulative(self) -> list[str]:
        """Prefixes of the prompt ending after the identity and after each part: their token
        counts give each piece's token span (CLIP tokenizes word by word, so a prefix that
        ends at a word boundary tokenizes as the start of the whole)."""
        pieces = [self.identity, *self.parts]
        return [self.prefix + " ".join(pieces[: n + 1]) for n in range(len(pieces))]


def frame_text(prompt: str) -> str:
    """A frame's own words: its prompt without character tags (the identity says who)."""
    text = TAG_RE.sub("", prompt)
    text = re.sub(r"\s+", " ", text).strip(" ,")
    return re.sub(r"\s+([,.;:!?])", r"\1", text)


def identity_text(story: Story) -> str:
    """P0: who the story is about (several characters: all of them, as 1Prompt1Story does)."""
    return ", ".join(story.cast.values())


def consolidated_frames(
    story: Story, template: str, max_frames: int, tokens: Callable[[str], int] = count_tokens
) -> dict[int, Consolidated]:
    """Each character frame's consolidated prompt ([NC] frames are not consolidated: they
    render from their own prompt). `template`: the style's prompt template."""
    prefix, _, suffix = (
        template.partition(TEMPLATE_SLOT)
        if TEMPLATE_SLOT in template
        else (
            "",
            "",
            "",
        )
    )
    pool = [
        i
        for i, frame in enumerate(story.frames)
        if NO_CHARACTER_TAG not in frame_tags(frame.prompt)
    ]
    texts = {i: frame_text(story.frames[i].prompt) for i in pool}
    identity = identity_text(story)
    out: dict[int, Consolidated] = {}
    ordered = [texts[i] for i in pool]
    if pool and len(
        circular_window(ordered, 0, identity, prefix, suffix, max_frames, tokens)
    ) == len(pool):
        # Everything fits: one prompt in story order for every frame.
        for index in pool:
            express = ordered.index(texts[index])  # (equal texts: the first of them)
            out[index] = Consolidated(
                prefix, identity, tuple(ordered), suffix, tuple(pool), express
            )
        return out
    for position, index in enumerate(pool):
        window = circular_window(
            [texts[i] for i in pool], position, identity, prefix, suffix, max_frames, tokens
        )
        frames = tuple(pool[p] for p in window)
        out[index] = Consolidated(prefix, identity, tuple(texts[i] for i in frames), suffix, frames)
    return out


def circular_window(
    texts: Sequence[str],
    start: int,
    identity: str,
    prefix: str,
    suffix: str,
    max_frames: int,
    tokens: Callable[[str], int] = count_tokens,
) -> list[int]:
    """Positions start, start+1, … (mod len) while the consolidated prompt stays within the
    encoder's budget; at least the frame itself (the plan warns if even that is too long)."""
    window = [start]
    for step in range(1, min(max_frames, len(texts))):
        candidate = [*window, (start + step) % len(texts)]
        joined = prefix + " ".join([identity, *(texts[p] for p in candidate)]) + suffix
        if tokens(joined) > CONTENT_TOKENS:
            break
        window = candidate
    return window
