"""From a validated story to a generation plan: final prompts, references, order, seeds.

Pure Python (no torch). The plan is what `--dry-run` prints and what `keyframes` executes.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from .config import Configs
from .story import NO_CHARACTER_TAG, TAG_RE, Story, frame_tags

Role = Literal["reference", "read", "plain", "window"]


def derive_seed(seed: int, *parts: object) -> int:
    """A stable 63-bit seed for one purpose (e.g. one pipeline call's CSA draws)."""
    digest = hashlib.sha256(json.dumps([seed, *map(str, parts)]).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def frame_characters(story: Story, prompt: str) -> tuple[str, ...]:
    """Characters a frame shows, in the story's definition order."""
    tags = frame_tags(prompt)
    if NO_CHARACTER_TAG in tags:
        return ()
    cast = story.cast
    if story.identity is not None:
        return tuple(cast)
    return tuple(name for name in cast if name in tags)


def single_character_frames(story: Story) -> dict[str, list[int]]:
    """For each character, the frames that show it and no other character."""
    out: dict[str, list[int]] = {name: [] for name in story.cast}
    for i, frame in enumerate(story.frames):
        shown = frame_characters(story, frame.prompt)
        if len(shown) == 1:
            out[shown[0]].append(i)
    return out


def expand_prompt(story: Story, prompt: str) -> str:
    """Replace `[Name]` tags by descriptions and drop `[NC]`; identity goes in front."""
    cast = story.cast

    def substitute(match: re.Match[str]) -> str:
        tag = match.group(1).strip()
        return "" if tag == NO_CHARACTER_TAG else cast[tag]

    no_character = NO_CHARACTER_TAG in frame_tags(prompt)
    text = TAG_RE.sub(substitute, prompt)
    text = re.sub(r"\s+", " ", text).strip(" ,")
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    if story.identity is not None and not no_character:
        text = f"{story.identity}, {text}" if text else story.identity
    return text


@dataclass(frozen=True)
class PlannedFrame:
    index: int  # 0-based position in the story
    file: str
    source: str  # the prompt as written in the story
    prompt: str  # after tags and style
    negative: str
    caption: str | None
    characters: tuple[str, ...]
    role: Role
    reference_of: str | None
    seed: int  # initial-noise seed

    @property
    def number(self) -> int:
        return self.index + 1

    def describe(self) -> dict[str, Any]:
        """The frame as recorded in plans, manifests and PNG metadata."""
        return {
            "frame": self.number,
            "file": self.file,
            "role": self.role,
            "reference_of": self.reference_of,
            "characters": list(self.characters),
            "prompt": self.prompt,
            "negative": self.negative,
            "caption": self.caption,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class GenerationCall:
    """One pipeline call: the frames it denoises together and the CSA phase it runs in."""

    phase: Literal["write", "read", "plain", "window"]
    frames: tuple[int, ...]
    character: str | None  # the character whose bank a write call fills
    csa_seed: int  # seeds the call's CSA generator (token samples, skips)


@dataclass(frozen=True)
class Plan:
    story: Story
    frames: tuple[PlannedFrame, ...]
    references: dict[str, tuple[int, ...]]  # empty when consistency is off
    calls: tuple[GenerationCall, ...]

    def dependencies(self, index: int) -> tuple[int, ...]:
        """Frames whose inputs shape this frame's pixels: its call's batch, the references it
        reads, itself."""
        deps = {index}
        for call in self.calls:
            if index in call.frames:
                deps.update(call.frames)
        for name in self.frames[index].characters:
            deps.update(self.references.get(name, ()))
        return tuple(sorted(deps))

    def frame_key(self, index: int, model: dict[str, Any]) -> str:
        """A hash of everything that determines a frame's pixels; equal keys, equal frames."""
        story = self.story
        deps = self.dependencies(index)
        payload = {
            "model": model,
            "settings": story.model_dump(
                include={
                    "width",
                    "height",
                    "steps",
                    "guidance",
                    "scheduler",
                    "noise",
                    "consistency",
                }
            ),
            "cast": story.cast,
            "frame": index,
            "dependencies": [asdict(self.frames[d]) | {"caption": None} for d in deps],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.story.name,
            "size": [self.story.width, self.story.height],
            "steps": self.story.steps,
            "guidance": self.story.guidance,
            "scheduler": self.story.scheduler,
            "noise": self.story.noise,
            "consistency": self.story.consistency.model_dump(),
            "references": {k: [i + 1 for i in v] for k, v in self.references.items()},
            "order": [
                {
                    "phase": c.phase,
                    "character": c.character,
                    "frames": [i + 1 for i in c.frames],
                }
                for c in self.calls
            ],
            "frames": [f.describe() for f in self.frames],
        }


def build_plan(story: Story, configs: Configs | None = None) -> Plan:
    """Resolve prompts, pick each character's references and order the pipeline calls."""
    configs = configs or Configs()
    style = configs.styles[story.style] if story.style else None
    negative = ", ".join(
        part for part in ((style.negative if style else ""), story.negative) if part.strip()
    )
    digits = max(2, len(str(len(story.frames))))
    # Each character's first `id_length` solo frames are denoised together in one batch. Without
    # consistency they are still batched the same way, so switching CSA off changes nothing but
    # the attention (batch composition alone can move float results by an ulp).
    id_length = story.consistency.id_length
    groups = {
        name: tuple(indexes[:id_length])
        for name, indexes in single_character_frames(story).items()
        if indexes
    }
    windowed = story.uses_consistency and story.consistency.mode == "window"
    if windowed:
        # Window mode: every frame with a character is denoised in one windowed call.
        groups = {}
    references = groups if story.uses_consistency else {}
    grouped = {i for idx in groups.values() for i in idx}
    reference_of = {i: name for name, idx in references.items() for i in idx}

    frames = []
    for i, spec in enumerate(story.frames):
        characters = frame_characters(story, spec.prompt)
        prompt = expand_prompt(story, spec.prompt)
        if style is not None:
            prompt = style.apply(prompt)
        if windowed and characters:
            role: Role = "window"
        elif i in reference_of:
            role = "reference"
        elif story.uses_consistency and characters:
            role = "read"
        else:
            role = "plain"
        frames.append(
            PlannedFrame(
                index=i,
                file=f"frame_{i + 1:0{digits}d}.png",
                source=spec.prompt,
                prompt=prompt,
                negative=negative,
                caption=spec.caption,
                characters=characters,
                role=role,
                reference_of=reference_of.get(i),
                seed=story.seed if story.noise == "shared" else story.seed + i,
            )
        )

    calls = [
        GenerationCall(
            "write" if story.uses_consistency else "plain",
            idx,
            name,
            derive_seed(story.seed, "write", name),
        )
        for name, idx in groups.items()
    ]
    window = tuple(f.index for f in frames if f.role == "window")
    if window:
        calls.append(GenerationCall("window", window, None, derive_seed(story.seed, "window")))
    calls += [
        GenerationCall(f.role, (f.index,), None, derive_seed(story.seed, "frame", f.index))
        for f in frames
        if f.index not in grouped and f.role != "window"
    ]
    return Plan(story, tuple(frames), references, tuple(calls))
