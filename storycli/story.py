"""The story file: pydantic schema, YAML loading with line-located errors, semantic checks.

Pure Python (no torch). `load_story` returns a fully resolved `Story` (defaults filled in) or
raises `StoryError` whose issues each carry `file:line:col field: message`.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal
from warnings import catch_warnings, simplefilter

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    field_validator,
)

from .config import SCHEDULERS, ConfigFileError, Configs
from .consistency.saved_bank import read_meta

Loc = tuple[str | int, ...]

TAG_RE = re.compile(r"\[([^\[\]]*)\]")
NO_CHARACTER_TAG = "NC"
IDENTITY_NAME = "identity"
MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt")
#: A story file over this many bytes is refused unread. Stories are a few kilobytes (1 MB is
#: thousands of frames), and PyYAML parses about a megabyte in seconds.
MAX_STORY_BYTES = 1024 * 1024
#: A picture file (`start_image`, a character's `image`, `ip_adapter.image`) over this is refused.
MAX_PICTURE_BYTES = 100 * 1024 * 1024
#: Prompt-like text (frame prompts, captions, identity, descriptions, negative): the text encoder
#: reads 77 tokens (a few hundred characters); far longer text is a mistake, and trimming it
#: costs time for nothing.
MAX_TEXT_CHARS = 20_000
#: Names that become file or folder names (story `name`, character names).
MAX_NAME_CHARS = 100


# ---------------------------------------------------------------------------------------------
# Errors


@dataclass
class StoryIssue:
    loc: Loc
    message: str
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based

    @property
    def field(self) -> str:
        return format_loc(self.loc)


@dataclass
class StoryError(Exception):
    """One or more problems with a story file; `str()` gives one line per problem."""

    path: Path | str
    issues: list[StoryIssue] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = []
        for issue in self.issues:
            where = str(self.path)
            if issue.line is not None:
                where += f":{issue.line}:{issue.column}"
            # The compiler-style `file:line:col field: message`, which editors can jump to.
            label = f" {issue.field}" if issue.loc else ""
            out.append(f"{where}{label}: {issue.message}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


# ---------------------------------------------------------------------------------------------
# Schema


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
    blocks: list[Literal["down", "mid", "up"]] = Field(min_length=1)
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


# ---------------------------------------------------------------------------------------------
# Loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            # Every key of a story is text; YAML would turn `yes:`/`1:` into a bool/int.
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f'key {key_node.value!r} must be text (quote it, e.g. "{key_node.value}":)'
                if isinstance(key_node, yaml.ScalarNode)
                else "keys must be plain text, not lists or mappings",
                key_node.start_mark,
            )
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}'", key_node.start_mark
            )
        out[key] = loader.construct_object(value_node, deep=True)
    return out


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _node_at(root: yaml.Node | None, loc: Loc, at_key: bool = False) -> yaml.Node | None:
    """The deepest YAML node along `loc` (a pydantic error location).

    With `at_key`, the last step gives the mapping key's node (for unknown keys).
    """
    node = root
    for depth, part in enumerate(loc):
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            pairs = [(k, v) for k, v in node.value if getattr(k, "value", None) == part]
            if not pairs:
                return node
            last = depth == len(loc) - 1
            node = pairs[0][0] if (at_key and last) else pairs[0][1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return node
            node = node.value[part]
        else:
            return node
    return node


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


_PYDANTIC_TAG = re.compile(r"^[a-z]+(-[a-z]+)*\[.*\]$")


# The members of `str | CharacterSpec` as pydantic names them in an error's location.
_UNION_MEMBERS = {"str", "constrained-str", "CharacterSpec"}


def _clean_loc(loc: tuple[Any, ...]) -> Loc:
    # Pydantic adds validator tags (e.g. 'function-before[...]') and union members' names
    # (a character is a description or a mapping) that mean nothing to users.
    return tuple(
        p for p in loc if isinstance(p, int) or not (_PYDANTIC_TAG.match(p) or p in _UNION_MEMBERS)
    )


def _union_issues(errors: list[dict[str, Any]]) -> list[tuple[Loc, str]]:
    """The errors as (location, message), one per problem where a value may be a text or a
    mapping (a character): the member the value is reports what is wrong with it; a value
    that is neither gets one line saying what it may be."""
    out: dict[tuple[Loc, str], None] = {}
    for error in errors:
        loc, kind, given = _clean_loc(error["loc"]), error["type"], error.get("input")
        if set(error["loc"]) & _UNION_MEMBERS and kind in (
            "string_type",
            "model_type",
            "dict_type",
        ):
            if isinstance(given, (str, dict)):
                continue  # the member it is not: the other member's errors say what is wrong
            out[(loc, "must be a description (text) or a mapping with `description:`")] = None
        else:
            out[(loc, _message(error))] = None
    return list(out)


def _message(error: dict[str, Any]) -> str:
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return "unknown key (check its spelling against the story format in README.md)"
    if kind == "missing":
        return "required"
    if kind == "literal_error":
        return msg.replace("Input should be", "must be")
    msg = msg.removeprefix("Value error, ").replace("Input should be", "must be")
    return msg[0].lower() + msg[1:] if msg else msg


def _merge_aliases(issues: list[StoryIssue]) -> list[StoryIssue]:
    """One line for one problem that YAML aliases repeat: the same message at the same node
    for fields that differ only in list positions (`frames[3].prompt`, `frames[4].prompt`)."""
    groups: dict[tuple[Any, ...], list[StoryIssue]] = {}
    for issue in issues:
        shape = tuple(None if isinstance(p, int) else p for p in issue.loc)
        key = (issue.line, issue.column, issue.message, shape) if issue.line else (id(issue),)
        groups.setdefault(key, []).append(issue)
    out = []
    for group in groups.values():
        first, more = group[0], len(group) - 1
        if more:
            first = StoryIssue(
                first.loc,
                f"{first.message} (and {more} more through YAML aliases of this text)",
                first.line,
                first.column,
            )
        out.append(first)
    return out


class FileRefused(ValueError):
    """A path that names no regular file of a sane size; the message says what it is."""


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def open_regular(path: Path, limit: int) -> BinaryIO:
    """Open `path` (links followed) for reading if it is a regular file of at most `limit`
    bytes. A FIFO, device or socket raises `FileRefused` without blocking (O_NONBLOCK: opening
    a FIFO no one writes would wait forever); missing files and folders raise `OSError`."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
        if not stat.S_ISREG(info.st_mode):
            raise FileRefused(f"is {_kind(info.st_mode)}, not a regular file")
        if info.st_size > limit:
            raise FileRefused(too_big(info.st_size, limit))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def too_big(size: int, limit: int) -> str:
    return f"is {size / 2**20:.1f} MB, over the {limit // 2**20} MB allowed"


def read_limited(path: Path, limit: int) -> bytes:
    """A regular file's bytes (see `open_regular`), reading at most `limit` + 1 of them."""
    with open_regular(path, limit) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:  # it grew since, or its size was not told
        raise FileRefused(f"is over the {limit // 2**20} MB allowed")
    return data


def decode_story(data: bytes) -> str:
    """A story file's text; `ValueError` with one sentence when it is not UTF-8 text."""
    utf16 = "not a UTF-8 text file (it looks like UTF-16: save it as UTF-8)"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ValueError(utf16)
    head = data[:4096]
    if b"\x00" in head:
        # UTF-16 without a byte-order mark: every other byte of ASCII text is zero.
        zeros = max(head[0::2].count(0), head[1::2].count(0))
        if zeros * 4 >= len(head):
            raise ValueError(utf16)
        raise ValueError("not a text file (it holds NUL bytes): save the story as UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not a UTF-8 text file") from None
    if "\x00" in text:
        raise ValueError("not a text file (it holds NUL bytes): save the story as UTF-8 text")
    return text


class StoryFile:
    """A story file's text, parsed, with node positions for error messages."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.text = text
        self.root: yaml.Node | None = None

    def error(self, issues: list[tuple[Loc, str]], overridden: Iterable[str] = ()) -> StoryError:
        """Locate each issue in the file; issues about command-line overrides name the option."""
        out = []
        overridden = set(overridden)
        for loc, message in issues:
            if loc and loc[0] in overridden:
                out.append(StoryIssue((f"--{loc[0]}", *loc[1:]), message))
                continue
            node = _node_at(self.root, loc, at_key=message.startswith("unknown key"))
            line = col = None
            if node is not None:
                line, col = node.start_mark.line + 1, node.start_mark.column + 1
            out.append(StoryIssue(loc, message, line, col))
        out.sort(key=lambda issue: (issue.line or 0, issue.column or 0))
        return StoryError(self.path, _merge_aliases(out))

    def parse(self) -> dict[str, Any]:
        try:
            self.root = yaml.compose(self.text, Loader=yaml.SafeLoader)
            data = yaml.load(self.text, Loader=_UniqueKeyLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            problem = exc.problem or "invalid YAML"
            if exc.context and "duplicate" not in problem:
                problem = f"{exc.context}: {problem}"
            issue = StoryIssue((), f"YAML syntax error: {problem}")
            if mark is not None:
                issue.line, issue.column = mark.line + 1, mark.column + 1
            raise StoryError(self.path, [issue]) from None
        except yaml.YAMLError as exc:
            raise StoryError(self.path, [StoryIssue((), f"YAML error: {exc}")]) from None
        if data is None:
            raise StoryError(
                self.path, [StoryIssue((), "the file is empty; a story needs at least `frames`")]
            )
        if not isinstance(data, dict):
            raise self.error(
                [
                    (
                        (),
                        "a story is a mapping of keys (name, frames, ...), "
                        f"not a {type(data).__name__}",
                    )
                ]
            )
        return data


def load_story(
    path: Path | str,
    configs: Configs | None = None,
    overrides: dict[str, Any] | None = None,
) -> Story:
    """Read, validate and resolve a story file. Raises `StoryError` on any problem.

    `overrides` (e.g. from `--model`, `--seed`) replace story values before validation.
    """
    path = Path(path)
    configs = configs or Configs()
    try:
        text = decode_story(read_limited(path, MAX_STORY_BYTES))
    except FileNotFoundError:
        raise StoryError(path, [StoryIssue((), "no such file")]) from None
    except IsADirectoryError:
        raise StoryError(
            path, [StoryIssue((), "is a folder, expected a .yaml story file")]
        ) from None
    except FileRefused as exc:
        raise StoryError(path, [StoryIssue((), f"{exc}: give a .yaml story file")]) from None
    except ValueError as exc:
        raise StoryError(path, [StoryIssue((), str(exc))]) from None
    except OSError as exc:
        raise StoryError(path, [StoryIssue((), f"cannot read ({exc.strerror})")]) from None

    source = StoryFile(path, text)
    data = source.parse()
    try:
        defaults = configs.defaults
    except ConfigFileError as exc:
        raise StoryError(path, [StoryIssue((), f"configuration problem: {exc}")]) from None
    # The default name is the file's stem, made safe for a folder name.
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-.") or "story"
    merged = _deep_merge(defaults, {"name": stem, **data, **(overrides or {})})
    try:
        story = Story.model_validate(merged)
    except ValidationError as exc:
        issues = _union_issues(exc.errors(include_url=False))
        if "name" in data or "name" in (overrides or {}):
            raise source.error(issues, overrides or ()) from None
        # The name came from the file name: there is no `name:` line to point at.
        error = source.error([i for i in issues if i[0] != ("name",)], overrides or ())
        if any(loc == ("name",) for loc, _ in issues):
            reason = (
                f"is {len(stem)} characters, over {MAX_NAME_CHARS}"
                if len(stem) > MAX_NAME_CHARS
                else "is not a valid name"
            )
            message = (
                f"the story's default name comes from the file name, and '{stem[:40]}"
                f"{'…' if len(stem) > 40 else ''}' {reason}: add a shorter `name:` to the "
                "story (letters, digits, . _ -)"
            )
            error.issues.insert(0, StoryIssue(("name",), message))
        raise error from None
    problems = check_story(story, configs, base_dir=path.parent)
    if problems:
        raise source.error(problems, overrides or ())
    return with_absolute_pictures(story, path.parent)


def with_absolute_pictures(story: Story, base_dir: Path) -> Story:
    """Pictures named relative to the story file, made absolute: the plan reads them from
    wherever the command runs."""
    update: dict[str, Any] = {}
    if story.start_image is not None:
        update["start_image"] = str(picture_path(story.start_image, base_dir).resolve())

    def absolute_adapter(adapter: IPAdapter) -> IPAdapter:
        return adapter.model_copy(
            update={
                "image": str(picture_path(adapter.image, base_dir).resolve()),
                "model": adapter_source(adapter, base_dir),
            }
        )

    if story.ip_adapter is not None:
        update["ip_adapter"] = absolute_adapter(story.ip_adapter)
    if story.characters and any(isinstance(c, CharacterSpec) for c in story.characters.values()):

        def absolute(spec: str | CharacterSpec) -> str | CharacterSpec:
            if isinstance(spec, str):
                return spec
            paths = {"image": spec.image, "bank": spec.bank}
            changes: dict[str, Any] = {
                key: str(picture_path(value, base_dir).resolve())
                for key, value in paths.items()
                if value is not None
            }
            if spec.ip_adapter is not None:
                changes["ip_adapter"] = absolute_adapter(spec.ip_adapter)
            return spec.model_copy(update=changes)

        update["characters"] = {name: absolute(spec) for name, spec in story.characters.items()}
    return story.model_copy(update=update) if update else story


# ---------------------------------------------------------------------------------------------
# Semantic checks (things one field's type cannot say)


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


def is_model_path(model: str) -> bool:
    return (
        model.startswith((".", "/", "~"))
        or model.lower().endswith(MODEL_FILE_SUFFIXES)
        or "\\" in model
    )


def resolve_model_path(model: str, base_dir: Path) -> Path:
    path = Path(model).expanduser()
    return path if path.is_absolute() else (base_dir / path)


def local_model_path(model: str, base_dir: Path) -> Path | None:
    """The file or folder a `model` value names, or None when it is a preset or hub id."""
    path = resolve_model_path(model, base_dir)
    return path if is_model_path(model) or path.exists() else None


def weights_identity(value: str, base_dir: Path) -> str:
    """A `model:`/`vae:` value as what it loads: a local file or folder's resolved path, else
    the value itself (a hub id)."""
    local = local_model_path(value, base_dir)
    return str(local.resolve()) if local is not None else value


def check_vae(vae: str, base_dir: Path) -> str | None:
    """Return a problem with a `vae` value, or None. Hub ids are not checked here."""
    path = local_model_path(vae, base_dir)
    if path is not None:
        if not path.exists():
            return f"VAE file or folder '{vae}' does not exist (looked at {path}); fix the path"
        if path.is_dir() and not (path / "config.json").is_file():
            return f"'{vae}' is a folder without config.json, not a diffusers VAE folder"
        if path.is_file() and not path.name.lower().endswith(MODEL_FILE_SUFFIXES):
            return f"'{vae}' is a file but not a .safetensors or .ckpt VAE"
        return None
    if re.fullmatch(r"[\w.-]+/[\w.-]+", vae):
        return None  # a hub id; whether it is cached is known only when loading
    return (
        f"unknown VAE '{vae}': use a hub id like madebyollin/sdxl-vae-fp16-fix, a local "
        "diffusers VAE folder or a .safetensors file"
    )


def check_model(model: str, configs: Configs, base_dir: Path) -> str | None:
    """Return a problem with a `model` value, or None. Hub ids are not checked here."""
    if model in configs.presets:
        return None
    path = local_model_path(model, base_dir)
    if path is not None:
        if not path.exists():
            return (
                f"model file or folder '{model}' does not exist (looked at {path}); "
                "fix the path, or use a preset: " + ", ".join(configs.presets)
            )
        if path.is_dir() and not (path / "model_index.json").exists():
            return f"'{model}' is a folder without model_index.json, not a diffusers model folder"
        if path.is_file() and not path.name.lower().endswith(MODEL_FILE_SUFFIXES):
            return f"'{model}' is a file but not a .safetensors or .ckpt checkpoint"
        return None
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        return None  # a hub id; whether it is cached is known only when loading
    return (
        f"unknown model '{model}': use a preset ({', '.join(configs.presets)}), "
        "a hub id like org/name, a local diffusers folder or a .safetensors file"
    )


def check_story(story: Story, configs: Configs, base_dir: Path) -> list[tuple[Loc, str]]:
    if story.identity is not None and story.characters is not None:
        # Checking tags against either cast would only add contradictory messages.
        return [(("characters",), "give either `identity` or `characters`, not both")]
    problems: list[tuple[Loc, str]] = []

    if (problem := check_model(story.model, configs, base_dir)) is not None:
        problems.append((("model",), problem))
    if story.vae is not None and (problem := check_vae(story.vae, base_dir)) is not None:
        problems.append((("vae",), problem))
    if story.style is not None and story.style not in configs.styles:
        problems.append(
            (
                ("style",),
                f"unknown style '{story.style}'; choose one of: {', '.join(configs.styles)}",
            )
        )
    spec = SCHEDULERS.get(story.scheduler)
    if spec is None:
        problems.append(
            (
                ("scheduler",),
                f"unknown scheduler '{story.scheduler}'; choose one of: {', '.join(SCHEDULERS)}",
            )
        )
    elif spec.unet_calls_per_step > 1 and story.uses_csa:
        problems.append(
            (
                ("scheduler",),
                f"'{story.scheduler}' calls the UNet {spec.unet_calls_per_step} times per step, "
                "but Consistent Self-Attention schedules by step; use a first-order scheduler "
                "such as euler, ddim or dpmpp-2m-karras",
            )
        )

    defined = story.cast
    for i, frame in enumerate(story.frames):
        tags = frame_tags(frame.prompt)
        names = [t for t in tags if t != NO_CHARACTER_TAG]
        for name in names:
            if story.characters is None:
                problems.append(
                    (
                        ("frames", i),
                        f"tag [{name}] names a character, but this story uses `identity`; "
                        "define characters under `characters:` to use tags",
                    )
                )
            elif name not in defined:
                # Tags are case-sensitive: point at the name that differs only in case.
                alike = [d for d in defined if d.casefold() == name.casefold()]
                hint = f" (tags are case-sensitive: [{alike[0]}]?)" if alike else ""
                problems.append(
                    (
                        ("frames", i),
                        f"unknown character tag [{name}]; defined: {', '.join(defined)}{hint}",
                    )
                )
        if NO_CHARACTER_TAG in tags and names:
            problems.append(
                (("frames", i), f"[{NO_CHARACTER_TAG}] frame cannot also show [{names[0]}]")
            )
        stripped = TAG_RE.sub("", frame.prompt).strip(" ,")
        if not stripped and not names:
            problems.append((("frames", i, "prompt"), "prompt is empty once tags are removed"))

    problems += check_pictures(story, base_dir)
    problems += check_banks(story, base_dir)
    if story.consistency.history and not (story.uses_csa and story.consistency.mode == "reference"):
        problems.append(
            (
                ("consistency", "history"),
                "rolling history is read by Consistent Self-Attention in reference mode: use "
                "method storydiffusion with mode reference, or history 0",
            )
        )
    if story.consistency.stride > story.consistency.window:
        problems.append(
            (("consistency", "stride"), "must not exceed consistency.window (frames would skip)")
        )
    if story.uses_csa and story.consistency.mode == "reference" and not problems:
        singles = single_character_frames(story)
        shown = {name for frame in story.frames for name in frame_characters(story, frame.prompt)}
        need = story.consistency.id_length
        for name in defined:
            if name in story.banks():
                continue  # read from its saved bank: it has no references
            have = len(singles[name])
            if have < need:
                where = ("characters", name) if story.characters is not None else ("identity",)
                if have:
                    used = f"is shown alone in only {have} frame(s)"
                elif name in shown:
                    # Frames with two characters are no references: say why they do not count.
                    used = "is never shown alone (only together with other characters)"
                else:
                    used = "is never shown"
                problems.append(
                    (
                        where,
                        f"character '{name}' {used}, but consistency.id_length is {need}: "
                        f"its first {need} solo frames are its references; add solo frames or "
                        "lower id_length",
                    )
                )
    return problems


def picture_path(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


def adapter_source(adapter: IPAdapter, base_dir: Path) -> str:
    """Where the adapter loads from: a local folder (absolute), else the hub id or `tiny`."""
    model = picture_path(adapter.model, base_dir)
    return str(model.resolve()) if model.is_dir() else adapter.model


def check_pictures(story: Story, base_dir: Path) -> list[tuple[Loc, str]]:
    """Pictures must be readable images, and frame 1 of a `start_image` must show one
    character (the picture's); a character's `image` needs a frame showing it alone."""
    from PIL import Image, UnidentifiedImageError

    problems: list[tuple[Loc, str]] = []
    where: list[tuple[Loc, str]] = []
    if story.start_image is not None:
        where.append((("start_image",), story.start_image))
        shown = frame_characters(story, story.frames[0].prompt)
        if len(shown) != 1:
            what = "no character" if not shown else f"{len(shown)} characters"
            problems.append(
                (
                    ("frames", 0),
                    f"frame 1 is the start_image, so it must show one character (it shows "
                    f"{what}); describe the picture's character in it",
                )
            )
    photos = story.photos()
    for owner, adapter in photos:
        at: Loc = ("ip_adapter",) if owner is None else ("characters", owner, "ip_adapter")
        where.append(((*at, "image"), adapter.image))
        # One adapter and one image encoder per pipeline: every photo goes through the same.
        for key, mine, first in (
            ("variant", adapter.variant, photos[0][1].variant),
            ("model", adapter_source(adapter, base_dir), adapter_source(photos[0][1], base_dir)),
        ):
            if mine != first:
                problems.append(
                    (
                        (*at, key),
                        f"is '{mine}' but the first photo's is '{first}': a story's photos "
                        f"share one IP-Adapter (give every ip_adapter the same {key})",
                    )
                )
    singles = single_character_frames(story)
    for name, spec in (story.characters or {}).items():
        if isinstance(spec, CharacterSpec) and spec.image is not None:
            where.append((("characters", name, "image"), spec.image))
            if not singles[name]:
                problems.append(
                    (
                        ("characters", name, "image"),
                        f"the picture is {name}'s first frame that shows it alone, but no frame "
                        "shows it alone; add one",
                    )
                )
    for loc, value in where:
        path = picture_path(value, base_dir)
        try:
            # A FIFO would hang and a huge file or a decompression bomb (a small PNG of a
            # gigapixel) exhaust memory: only regular files, and PIL's pixel limit as an error.
            with open_regular(path, MAX_PICTURE_BYTES) as handle, catch_warnings():
                simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(handle) as image:
                    image.verify()
        except FileNotFoundError:
            problems.append((loc, f"picture '{value}' does not exist (looked at {path})"))
        except IsADirectoryError:
            problems.append((loc, f"'{value}' is a folder, not a picture; name a picture file"))
        except FileRefused as exc:
            problems.append((loc, f"'{value}' {exc}; name a picture file"))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            problems.append(
                (
                    loc,
                    f"'{value}' decodes to more than {Image.MAX_IMAGE_PIXELS:,} pixels (a "
                    "decompression bomb?); use a smaller picture",
                )
            )
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            problems.append((loc, f"'{value}' is not a readable image ({exc})"))
    return problems


def check_banks(story: Story, base_dir: Path) -> list[tuple[Loc, str]]:
    problems: list[tuple[Loc, str]] = []
    for name, spec in (story.characters or {}).items():
        if not isinstance(spec, CharacterSpec) or spec.bank is None:
            continue
        loc: Loc = ("characters", name, "bank")
        if spec.image is not None:
            problems.append((loc, "give a saved `bank` or an `image`, not both"))
        elif not story.uses_csa:
            problems.append(
                (
                    loc,
                    "a saved bank is read by Consistent Self-Attention: use method storydiffusion",
                )
            )
        else:
            try:
                read_meta(picture_path(spec.bank, base_dir))
            except ValueError as exc:
                problems.append((loc, str(exc)))
    return problems


def story_warnings(story: Story) -> list[tuple[Loc, str]]:
    """Things a valid story probably did not mean (the plan carries them as warnings)."""
    warnings: list[tuple[Loc, str]] = []
    first: dict[str, str] = {}
    for name in story.characters or {}:
        other = first.setdefault(name.casefold(), name)
        if other != name:
            # Both are valid, but a tag typed in the wrong case silently picks the other one.
            warnings.append(
                (
                    ("characters", name),
                    f"'{name}' and '{other}' differ only in case; tags are case-sensitive, so "
                    f"[{name}] and [{other}] are two characters: rename one",
                )
            )
    return warnings
