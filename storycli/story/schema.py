"""The story file's schema: pydantic models of every key, with their defaults and limits.

Pure Python (no torch). Also the small questions asked of a story everywhere (which characters a
frame shows, which frames show one character alone).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    field_validator,
)

Loc = tuple[str | int, ...]


TAG_RE = re.compile(r"\[([^\[\]]*)\]")


NO_CHARACTER_TAG = "NC"


IDENTITY_NAME = "identity"


#: Prompt-like text (frame prompts, captions, identity, descriptions, negative): the text encoder
#: reads 77 tokens (a few hundred characters); far longer text is a mistake, and trimming it
#: costs time for nothing.
MAX_TEXT_CHARS = 20_000


#: Names that become file or folder names (story `name`, character names).
MAX_NAME_CHARS = 100


class _Strict(BaseModel):
    # `allow_inf_nan=False`: YAML reads `.inf`/`.nan` as floats, and an infinite guidance
    # validates but renders black frames.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


Rate = Annotated[float, Field(ge=0.0, le=1.0)]


def _text_limit(value: str | None) -> str | None:
    if value is not None and len(value) > MAX_TEXT_CHARS:
        raise ValueError(_too_long(value))
    return value


def _too_long(value: str) -> str:
    return (
        f"is {len(value):,} characters, over the {MAX_TEXT_CHARS:,} allowed (the text encoder "
        f"reads only 77 tokens, a few hundred characters): shorten it"
    )


Text = Annotated[str, AfterValidator(_text_limit)]

#: `consistency.blocks` entries: SDXL's UNet parts (also FLUX.1's, by analogy), or FLUX.1's
#: transformer blocks by stream and index (`consistency.csa_dit` has the meaning of each).
UNET_BLOCKS = ("down", "mid", "up")
#: Groups: a word (a UNet part or a whole stream), or a stream, its first and last index.
BLOCK_NAME = re.compile(r"(down|mid|up|double|single)|(double|single)\.(\d+)(?:-(\d+))?")


def _check_block(value: str) -> str:
    match = BLOCK_NAME.fullmatch(value)
    if match is None:
        raise ValueError(
            f"unknown block {value!r}: use down, mid, up or, on FLUX.1, double, single, "
            "double.<i>, single.<i> or a range like single.20-37"
        )
    first, last = match.group(3), match.group(4)
    if last is not None and int(last) < int(first):
        raise ValueError(f"block range {value!r} goes down: write the lower index first")
    return value


BlockName = Annotated[str, AfterValidator(_check_block)]


class Bank(_Strict):
    """What the reference bank holds (see README, "Story format")."""

    dtype: Literal["auto", "float32", "float16", "bfloat16"]
    levels: list[Literal["sa32", "sa64"]] = Field(min_length=1)
    max_step: int | None = Field(ge=1)


METHODS = ("storydiffusion", "one-prompt", "none")


def _check_methods(value: Any) -> str | list[str]:
    """A method or a list of methods (one message for any mistake, not one per union arm)."""
    choices = "'storydiffusion', 'one-prompt' or 'none'"
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        raise ValueError("name at least one method, or `none`")
    for item in values:
        if item not in METHODS:
            raise ValueError(f"must be {choices}, or a list of them (got {item!r})")
    if len(set(values)) != len(values):
        raise ValueError("list each method at most once")
    if "none" in values and len(values) > 1:
        raise ValueError("`none` cannot be combined with other methods")
    return value


class Reweight(_Strict):
    """One Singular-Value Reweighting: every singular value σ of a token set becomes
    β·exp(−α·σ)·σ (α < 0 enhances, α > 0 suppresses), the official code's single form."""

    alpha: float
    beta: float = Field(ge=0.0)


class OnePrompt(_Strict):
    """1Prompt1Story settings (see README, "Story format")."""

    reweight: Literal["svr", "svr-eot", "naive"]
    enhance: Reweight
    suppress: Reweight
    eot_scale: float = Field(gt=0.0, le=1.0)  # svr-eot: EOT rows scaled on every SVR call
    naive_enhance: float = Field(ge=0.0)  # naive: the expressed frame's rows times this
    naive_suppress: float = Field(ge=0.0)  # naive: every other frame's rows times this
    ipca: bool  # identity-preserving cross-attention
    max_frames: int = Field(ge=1)  # frames per consolidated prompt (the code's window of 10)


class Consistency(_Strict):
    """Consistency settings: the method(s), Consistent Self-Attention's and 1Prompt1Story's
    (see README, "Story format")."""

    method: Annotated[str | list[str], PlainValidator(_check_methods)]
    sa32: Rate
    sa64: Rate
    id_length: int = Field(ge=1)
    blocks: list[BlockName] = Field(min_length=1)
    warmup_steps: int = Field(ge=0)
    prob_early: Rate
    prob_late: Rate
    late_from_step: int = Field(ge=0)
    impl: Literal["fast", "reference"]
    sampling: Literal["uniform", "temporal"]
    bank: Bank
    mode: Literal["reference", "window"]
    window: int = Field(ge=2)
    stride: int = Field(ge=1)
    # Rolling history: a read frame also reads samples of the K read frames before it (same step).
    history: int = Field(ge=0)
    one_prompt: OnePrompt

    @property
    def methods(self) -> tuple[str, ...]:
        methods = self.method if isinstance(self.method, list) else [self.method]
        return tuple(m for m in methods if m != "none")

    @field_validator("blocks")
    @classmethod
    def _unique_blocks(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("list each block at most once")
        return value


class FreeU(_Strict):
    """FreeU's re-weighting of the UNet's skip (s1, s2) and backbone (b1, b2) features, as
    diffusers' `enable_freeu`; StoryDiffusion's app uses s1 0.6, s2 0.4, b1 1.1, b2 1.2."""

    s1: float = Field(ge=0.0)
    s2: float = Field(ge=0.0)
    b1: float = Field(ge=0.0)
    b2: float = Field(ge=0.0)


class IPAdapter(_Strict):
    """A reference photo through IP-Adapter (see README, "Story format")."""

    image: str = Field(min_length=1)  # the photo, relative to the story file
    scale: float = Field(default=0.6, ge=0.0)
    variant: Literal["plain", "plus", "plus-face"] = "plain"
    model: str = Field(default="h94/IP-Adapter", min_length=1)  # hub id, folder or `tiny`


class CharacterSpec(_Strict):
    """A character given as a mapping: its description, and optionally its picture."""

    # Length-checked by `Story._character_names` (here, a union arm would add a second error).
    description: str = Field(min_length=1)
    # A picture of the character (path relative to the story file): its first solo frame.
    image: str | None = Field(default=None, min_length=1)
    # A saved character (`generate --save-characters`): its bank instead of its references.
    bank: str | None = Field(default=None, min_length=1)
    # A reference photo of this character through IP-Adapter: it conditions the frames that
    # show the character (the story's own `ip_adapter` conditions every frame).
    ip_adapter: IPAdapter | None = None


class FrameSpec(_Strict):
    prompt: Text = Field(min_length=1)
    caption: Text | None = None


def _frame_from_yaml(value: Any) -> Any:
    """`"prompt #caption"` shorthand → mapping; anything else is left to the schema."""
    if isinstance(value, str):
        prompt, sep, caption = value.rpartition("#")
        if not sep:
            return {"prompt": value.strip(), "caption": None}
        return {"prompt": prompt.strip(), "caption": caption.strip() or None}
    if isinstance(value, dict):
        return value
    raise ValueError(
        'a frame is a string "prompt #caption" or a mapping with `prompt` (and optional `caption`)'
    )


Frame = Annotated[FrameSpec, BeforeValidator(_frame_from_yaml)]


def _multiple_of_32(value: int) -> int:
    if value % 32:
        lower, upper = value // 32 * 32, (value // 32 + 1) * 32
        raise ValueError(f"must be a multiple of 32 (try {lower or 32} or {upper})")
    return value


Size = Annotated[int, Field(ge=64, le=4096)]


class Story(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)
    model: str = Field(min_length=1)
    vae: str | None = Field(default=None, min_length=1)  # replaces the model's: hub id, path
    style: str | None = None
    identity: Text | None = Field(default=None, min_length=1)
    characters: dict[str, Annotated[str, Field(min_length=1)] | CharacterSpec] | None = None
    # A picture that is frame 1 (continue a story from it): path relative to the story file.
    start_image: str | None = Field(default=None, min_length=1)
    ip_adapter: IPAdapter | None = None
    layout: Literal["grid", "four-panel", "classic"] = "grid"  # comic pages (render.pages)
    caption_font_size: int | None = Field(default=None, ge=6, le=400)
    frames: list[Frame] = Field(min_length=1)
    negative: Text
    seed: int = Field(ge=0, le=2**32 - 1)
    width: Size
    height: Size
    steps: int = Field(ge=1, le=1000)
    guidance: float = Field(ge=0.0)
    scheduler: str
    noise: Literal["shared", "identical", "per-frame"]
    freeu: FreeU | None
    consistency: Consistency

    _check_sizes = field_validator("width", "height")(_multiple_of_32)

    @field_validator("name", mode="before")
    @classmethod
    def _name_length(cls, value: Any) -> Any:
        if isinstance(value, str) and len(value) > MAX_NAME_CHARS:
            raise ValueError(
                f"is {len(value)} characters; the name becomes the output folder's name, so use "
                f"at most {MAX_NAME_CHARS}"
            )
        return value

    @field_validator("characters")
    @classmethod
    def _character_names(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("define at least one character, or use `identity`")
        for name in value:
            if name == NO_CHARACTER_TAG or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9 _'.-]*", name):
                raise ValueError(
                    f"'{name}' cannot be a character name (letters, digits, spaces, _ ' . -; "
                    f"not {NO_CHARACTER_TAG})"
                )
            if len(name) > MAX_NAME_CHARS:
                # It names a folder (`generate --save-characters`); file names have a limit.
                raise ValueError(
                    f"character name '{name[:40]}…' is {len(name)} characters; a name becomes a "
                    f"folder name, so use at most {MAX_NAME_CHARS}"
                )
        for name, spec in value.items():
            description = spec if isinstance(spec, str) else spec.description
            if len(description) > MAX_TEXT_CHARS:
                raise ValueError(f"character '{name}': the description {_too_long(description)}")
        return value

    @property
    def cast(self) -> dict[str, str]:
        """Character name → description, in definition order (identity form: one entry)."""
        if self.identity is not None:
            return {IDENTITY_NAME: self.identity}
        return {
            name: spec if isinstance(spec, str) else spec.description
            for name, spec in (self.characters or {}).items()
        }

    def photos(self) -> tuple[tuple[str | None, IPAdapter], ...]:
        """The IP-Adapter photos with the character each conditions (None: every frame): the
        story's own first, then the characters' in definition order."""
        own: tuple[tuple[str | None, IPAdapter], ...] = (
            ((None, self.ip_adapter),) if self.ip_adapter is not None else ()
        )
        return own + tuple(
            (name, spec.ip_adapter)
            for name, spec in (self.characters or {}).items()
            if isinstance(spec, CharacterSpec) and spec.ip_adapter is not None
        )

    def banks(self) -> dict[str, str]:
        """Character name → the saved character folder it is read from."""
        return {
            name: spec.bank
            for name, spec in (self.characters or {}).items()
            if isinstance(spec, CharacterSpec) and spec.bank is not None
        }

    def pictures(self) -> dict[int, str]:
        """Frame index → the picture that frame is (as written in the story): `start_image`
        is frame 1; a character's `image` is its first frame that shows it alone."""
        out: dict[int, str] = {}
        if self.start_image is not None:
            out[0] = self.start_image
        singles = single_character_frames(self)
        for name, spec in (self.characters or {}).items():
            if isinstance(spec, CharacterSpec) and spec.image is not None and singles[name]:
                out.setdefault(singles[name][0], spec.image)
        return out

    @property
    def uses_csa(self) -> bool:
        """StoryDiffusion's Consistent Self-Attention (references, bank, read frames)."""
        return "storydiffusion" in self.consistency.methods

    @property
    def uses_one_prompt(self) -> bool:
        """1Prompt1Story: consolidated prompts, reweighted embeddings, identity attention."""
        return "one-prompt" in self.consistency.methods


def frame_tags(prompt: str) -> list[str]:
    return [t.strip() for t in TAG_RE.findall(prompt)]


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
