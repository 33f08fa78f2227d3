"""From a validated story to a generation plan: final prompts, references, order, seeds.

Pure Python (no torch). The plan is what `--dry-run` prints and what `keyframes` executes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from storycli.config import Configs, Style
from storycli.consistency.consolidate import Consolidated, consolidated_frames
from storycli.keyframes.t5_budget import T5Counter, preset_t5_tokens, t5_counter
from storycli.saved_banks import read_meta
from storycli.seeds import derive_seed
from storycli.story.checks import story_warnings
from storycli.story.family import story_family
from storycli.story.loader import format_loc
from storycli.story.schema import (
    NO_CHARACTER_TAG,
    TAG_RE,
    Loc,
    Story,
    frame_characters,
    frame_tags,
    single_character_frames,
)
from storycli.story.tokens import MAX_LENGTH, Fitted, count_tokens, encoder_cut, fit_prompt, quote

Role = Literal["reference", "read", "plain", "window"]


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
    seed: int  # seeds the CPU generator this frame's initial noise is drawn from
    # Which image of that generator's batch draw is this frame's noise (0: the first): what a
    # frame at that position of one pipeline call's batch starts from. See `noise_draws`.
    noise_index: int = 0
    # A picture this frame is (start_image, a character's image): written unchanged, and in
    # its character's reference forward at every step, noised to that step's level.
    picture: str | None = None
    picture_sha256: str | None = None

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
            "noise_index": self.noise_index,
        } | ({"picture": self.picture} if self.picture else {})


@dataclass(frozen=True)
class GenerationCall:
    """One pipeline call: the frames it denoises together and the CSA phase it runs in."""

    phase: Literal["write", "read", "plain", "window"]
    frames: tuple[int, ...]
    character: str | None  # the character whose bank a write call fills
    csa_seed: int  # seeds the call's CSA generator (token samples, skips)


@dataclass(frozen=True)
class PlanWarning:
    """Something the story allows but probably did not mean; the plan still runs."""

    loc: Loc  # as in StoryIssue: ("frames", 3), ("characters", "ann"), ("negative",)
    message: str

    @property
    def field(self) -> str:
        return format_loc(self.loc)

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


@dataclass(frozen=True)
class Plan:
    story: Story
    frames: tuple[PlannedFrame, ...]
    references: dict[str, tuple[int, ...]]  # empty when consistency is off
    calls: tuple[GenerationCall, ...]
    # Not part of any frame key: a warning changes no pixels (a trimmed prompt does, and is
    # in its frame's `prompt`).
    warnings: tuple[PlanWarning, ...] = ()
    # 1Prompt1Story: each character frame's consolidated prompt and its pieces (its `prompt`
    # is that prompt, so frame keys already cover it).
    consolidated: Mapping[int, Consolidated] = field(default_factory=dict)
    # Saved characters: name → (folder, digest of its steps); their frames read that bank.
    banks: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    # IP-Adapter photos' contents, by the character each conditions (None: the story's own).
    photo_sha256: Mapping[str | None, str] = field(default_factory=dict)
    # The model's family as known before loading ("sdxl", "flux"; None: a hub id not cached).
    # Not in frame keys: the model's id already tells frames of different families apart.
    family: str | None = None
    # FLUX.1: the model preset's T5 positions per prompt (`t5_tokens:`; None: the tokenizer's).
    # In frame keys only when set: a different length is a different text encoding.
    t5_tokens: int | None = None

    def dependencies(self, index: int) -> tuple[int, ...]:
        """Frames whose inputs shape this frame's pixels: its call's batch, the references it
        reads, itself."""
        deps = {index}
        # Rolling history: a read frame reads the read frames before it, which read theirs.
        if self.story.consistency.history and self.frames[index].role == "read":
            deps.update(self.history_before(index, every=True))
        for i in list(deps):
            for call in self.calls:
                if i in call.frames:
                    deps.update(call.frames)
            for name in self.frames[i].characters:
                deps.update(self.references.get(name, ()))
        return tuple(sorted(deps))

    def history_before(self, index: int, every: bool = False) -> tuple[int, ...]:
        """The read frames before `index` in story order whose samples it reads (`history`
        of them; `every`: all, which they in turn depend on)."""
        before = [f.index for f in self.frames[:index] if f.role == "read"]
        history = self.story.consistency.history
        return tuple(before if every else before[-history:] if history else ())

    def frame_key(self, index: int, model: dict[str, Any]) -> str:
        """A hash of everything that determines a frame's pixels; equal keys, equal frames."""
        story = self.story
        deps = self.dependencies(index)
        settings = story.model_dump(
            include={"width", "height", "steps", "guidance", "scheduler", "noise", "freeu"}
        )
        # 1Prompt1Story's settings only where it runs: stories without it keep their keys.
        # Settings of methods a story does not use stay out: its keys stay as they were.
        unused = ({"one_prompt"} if not story.uses_one_prompt else set()) | (
            {"history"} if not story.consistency.history else set()
        )
        consistency = story.consistency.model_dump(exclude=unused or None)
        banks = {
            c: self.banks[c][1] for d in deps for c in self.frames[d].characters if c in self.banks
        }
        photos = {
            owner: adapter.model_dump() | {"sha256": self.photo_sha256[owner]}
            for owner, adapter in story.photos()
        }
        shown = {c for d in deps for c in self.frames[d].characters}
        payload = {
            **({"banks": dict(sorted(banks.items()))} if banks else {}),  # only where used
            **({"ip_adapter": photos[None]} if None in photos else {}),
            # Characters' photos: those of the characters this frame's pixels depend on. The key
            # is there whenever the story has any (they switch the adapter to per-frame masks).
            **(
                {"character_photos": {c: p for c, p in photos.items() if c in shown}}
                if any(c is not None for c in photos)
                else {}
            ),
            "model": model | ({"t5_tokens": self.t5_tokens} if self.t5_tokens else {}),
            "settings": settings | {"consistency": consistency},
            "cast": story.cast,
            "frame": index,
            "dependencies": [key_fields(self.frames[d]) for d in deps],
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
            "consolidated": {
                str(i + 1): [j + 1 for j in c.frames] for i, c in self.consolidated.items()
            },
            "warnings": [{"field": w.field, "message": w.message} for w in self.warnings],
        }


def key_fields(frame: PlannedFrame) -> dict[str, Any]:
    """What of a frame goes into the keys of the frames depending on it: all but its caption
    (and the picture fields of frames that are no pictures, so their keys stay as they were)."""
    fields = asdict(frame) | {"caption": None}
    if frame.picture is None:
        del fields["picture"], fields["picture_sha256"]
    return fields


def _file_sha256(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def _over_budget(fitted: Fitted, characters: tuple[str, ...], style: str | None) -> str:
    head = f"prompt is {fitted.tokens} tokens, over the text encoder's {MAX_LENGTH}"
    if fitted.trimmed:
        fix = "shorten the frame or its character description" if characters else "shorten it"
        return f'{head}: dropped "{quote(fitted.dropped or "")}"; {fix}'
    # Not even the frame's first word fits beside the style: the encoder cuts as it always did.
    return (
        f"{head}, and its first word does not fit beside style '{style}': the text encoder "
        f'drops "{quote(fitted.dropped or "")}"; shorten the style or the frame'
        if style
        else f'{head}: the text encoder drops "{quote(fitted.dropped or "")}"; shorten the frame'
    )


def _window_frames(story: Story) -> list[tuple[int, tuple[str, ...]]]:
    """Window mode: the frames (with their characters) its one windowed call denoises."""
    if not (story.uses_csa and story.consistency.mode == "window"):
        return []
    shown = [(i, frame_characters(story, f.prompt)) for i, f in enumerate(story.frames)]
    return [(i, characters) for i, characters in shown if characters]


def noise_draws(story: Story, batches: list[tuple[int, ...]]) -> dict[int, tuple[int, int]]:
    """Each frame's initial noise as (generator seed, position in that generator's draw).

    `shared` (the default, as StoryDiffusion's app): a batch (a character's references, a
    window) draws its images' noise from one generator seeded with the story's seed, so they
    differ; every other frame starts from the noise that seed gives one image (the first
    reference's). `identical`: every frame starts from the very same noise. `per-frame`: frame
    i draws from seed + i. A frame's noise never depends on which frames run with it.
    """
    out = {i: (story.seed, 0) for i in range(len(story.frames))}
    if story.noise == "per-frame":
        return {i: (story.seed + i, 0) for i in out}
    if story.noise == "shared":
        for batch in batches:
            out |= {index: (story.seed, position) for position, index in enumerate(batch)}
    return out


def build_plan(story: Story, configs: Configs | None = None, base_dir: Path | None = None) -> Plan:
    """Resolve prompts, pick each character's references and order the pipeline calls.

    `base_dir` (the story file's folder; default: the working folder) resolves a relative
    `model:` path, whose family sets the prompt budget: SDXL's CLIP 77 tokens (prompts trimmed
    to fit), FLUX.1's T5 (`_flux_prompts`)."""
    configs = configs or Configs()
    style = configs.styles[story.style] if story.style else None
    negative = _negative_prompt(story, style)
    groups = _reference_groups(story)
    references = groups if story.uses_csa else {}
    family = story_family(story.model, configs, base_dir or Path.cwd())
    warnings = _plan_warnings(story, negative, family)
    consolidated = _consolidated(story, style)
    if family == "flux":
        fit = _flux_prompts(story, style, configs, base_dir or Path.cwd(), warnings)
    else:

        def fit(expanded: str, characters: tuple[str, ...], i: int) -> str:
            return _fitted_prompt(expanded, style, story.style, characters, i, warnings)

    frames = _plan_frames(story, fit, negative, groups, references, consolidated, warnings)
    calls = _order_calls(story, groups, frames)
    banks = {
        name: (folder, read_meta(Path(folder))["digest"]) for name, folder in story.banks().items()
    }
    return Plan(
        story,
        tuple(frames),
        references,
        tuple(calls),
        tuple(warnings),
        consolidated,
        banks,
        {owner: _file_sha256(adapter.image) for owner, adapter in story.photos()},
        family,
        preset_t5_tokens(story.model, configs) if family == "flux" else None,
    )


def _negative_prompt(story: Story, style: Style | None) -> str:
    """The style's negative prompt, then the story's (empty parts left out)."""
    return ", ".join(
        part for part in ((style.negative if style else ""), story.negative) if part.strip()
    )


def _reference_groups(story: Story) -> dict[str, tuple[int, ...]]:
    """The frames denoised together in one batch per character: its first `id_length` solo
    frames (not of a saved character, which reads its bank; none in window mode)."""
    if story.uses_csa and story.consistency.mode == "window":
        # Window mode: every frame with a character is denoised in one windowed call.
        return {}
    # Without consistency they are still batched the same way, so switching CSA off changes
    # nothing but the attention (batch composition alone can move float results by an ulp).
    id_length = story.consistency.id_length
    saved = story.banks()
    return {
        name: tuple(indexes[:id_length])
        for name, indexes in single_character_frames(story).items()
        if indexes and name not in saved
    }


def _plan_warnings(story: Story, negative: str, family: str | None) -> list[PlanWarning]:
    """The story's own warnings, then a negative prompt the text encoder would cut (FLUX.1
    reads no negative prompt)."""
    warnings = [PlanWarning(loc, message) for loc, message in story_warnings(story)]
    if family != "flux" and (cut := encoder_cut(negative)) is not None:
        warnings.append(
            PlanWarning(
                ("negative",),
                f"negative prompt (style's, then the story's) is {count_tokens(negative) + 2} "
                f'tokens, over the text encoder\'s {MAX_LENGTH}: "{quote(cut)}" is ignored; '
                "shorten it",
            )
        )
    return warnings


def _consolidated(story: Story, style: Style | None) -> dict[int, Consolidated]:
    """1Prompt1Story: each character frame's consolidated prompt (none without it)."""
    if not story.uses_one_prompt:
        return {}
    return consolidated_frames(
        story, style.prompt if style else "{prompt}", story.consistency.one_prompt.max_frames
    )


#: A frame's expanded prompt → its planned prompt (given its characters and index).
Fit = Callable[[str, tuple[str, ...], int], str]


def _plan_frames(
    story: Story,
    fit: Fit,
    negative: str,
    groups: dict[str, tuple[int, ...]],
    references: dict[str, tuple[int, ...]],
    consolidated: dict[int, Consolidated],
    warnings: list[PlanWarning],
) -> list[PlannedFrame]:
    """Every frame planned, in story order; prompts over budget add to `warnings`."""
    digits = max(2, len(str(len(story.frames))))
    reference_of = {i: name for name, idx in references.items() for i in idx}
    pictures = story.pictures()
    noise = noise_draws(story, [*groups.values(), tuple(i for i, _ in _window_frames(story))])
    frames = []
    expanded: dict[str, str] = {}  # a prompt repeated (YAML aliases) is expanded once
    for i, spec in enumerate(story.frames):
        characters = frame_characters(story, spec.prompt)
        if i in consolidated:
            prompt = _consolidated_prompt(consolidated[i], i, warnings)
        else:
            if spec.prompt not in expanded:
                expanded[spec.prompt] = expand_prompt(story, spec.prompt)
            prompt = fit(expanded[spec.prompt], characters, i)
        frames.append(
            PlannedFrame(
                index=i,
                file=f"frame_{i + 1:0{digits}d}.png",
                source=spec.prompt,
                prompt=prompt,
                negative=negative,
                caption=spec.caption,
                characters=characters,
                role=_frame_role(story, characters, i in reference_of),
                reference_of=reference_of.get(i),
                seed=noise[i][0],
                noise_index=noise[i][1],
                picture=pictures.get(i),
                picture_sha256=_file_sha256(pictures[i]) if i in pictures else None,
            )
        )
    return frames


def _consolidated_prompt(consolidated: Consolidated, i: int, warnings: list[PlanWarning]) -> str:
    """A 1Prompt1Story frame's prompt. Its window is as long as fits: only an identity and
    frame too long on their own go over, and the encoder cuts their end."""
    prompt = consolidated.prompt
    if (cut := encoder_cut(prompt)) is not None:
        warnings.append(
            PlanWarning(
                ("frames", i),
                f"identity and frame are {count_tokens(prompt)} tokens together, over "
                f'the text encoder\'s {MAX_LENGTH}: "{quote(cut)}" is dropped; '
                "shorten them",
            )
        )
    return prompt


def _fitted_prompt(
    expanded: str,
    style: Style | None,
    style_name: str | None,
    characters: tuple[str, ...],
    i: int,
    warnings: list[PlanWarning],
) -> str:
    """A frame's expanded prompt in its style, trimmed to the text encoder's budget.

    SDXL's text encoders see 77 tokens and diffusers cuts the rest: the end, which is the
    style's suffix. Trimming the frame's own text instead keeps the style and makes the
    planned prompt exactly what gets encoded. Prompts within budget are left as they are,
    so they encode (and render) exactly as in diffusers and the reference code, which
    chunked long-prompt encoding (compel / sd_embed style) would not; chunking can come
    with the project's own pipeline loop later."""
    fitted = fit_prompt(expanded, style.apply if style else str)
    if fitted.dropped is not None:
        warnings.append(PlanWarning(("frames", i), _over_budget(fitted, characters, style_name)))
    return fitted.prompt


def _flux_prompts(
    story: Story,
    style: Style | None,
    configs: Configs,
    base_dir: Path,
    warnings: list[PlanWarning],
) -> Fit:
    """FLUX.1's prompts: in their style, never trimmed (T5 reads hundreds of tokens; CLIP's
    pooled vector reads the first 77, as it is meant to), counted against the T5 budget with
    the model's own T5 tokenizer where one is on disk (`t5_budget`), else one warning that the
    count is skipped."""
    counter = t5_counter(story.model, configs, base_dir)
    if counter is None:
        warnings.append(
            PlanWarning(
                ("model",),
                f"no T5 tokenizer of '{story.model}' is on disk before loading, so prompts are "
                "not counted against FLUX.1's T5 budget (the T5 count is skipped); they are "
                "not trimmed",
            )
        )

    def fit(expanded: str, characters: tuple[str, ...], i: int) -> str:
        prompt = style.apply(expanded) if style else expanded
        if counter is not None and (cut := counter.cut(prompt)) is not None:
            warnings.append(PlanWarning(("frames", i), _over_t5(counter, prompt, cut, characters)))
        return prompt

    return fit


def _over_t5(counter: T5Counter, prompt: str, cut: str, characters: tuple[str, ...]) -> str:
    fix = "shorten the frame or its character description" if characters else "shorten it"
    return (
        f"prompt is {counter.count(prompt)} T5 tokens, over FLUX.1's T5 budget of "
        f'{counter.budget}: T5 drops "{quote(cut)}"; {fix}'
    )


def _frame_role(story: Story, characters: tuple[str, ...], is_reference: bool) -> Role:
    """What a frame does in the story loop: shown in the window, a character's reference,
    reading the references (CSA), or plain."""
    if story.uses_csa and story.consistency.mode == "window" and characters:
        return "window"
    if is_reference:
        return "reference"
    if story.uses_csa and characters:
        return "read"
    return "plain"


def _order_calls(
    story: Story, groups: dict[str, tuple[int, ...]], frames: list[PlannedFrame]
) -> list[GenerationCall]:
    """The pipeline calls in order: each character's batch, the window, then every other
    frame alone."""
    grouped = {i for idx in groups.values() for i in idx}
    calls = [
        GenerationCall(
            "write" if story.uses_csa else "plain",
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
    return calls
