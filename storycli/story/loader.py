"""Loading a story: YAML with line-located errors, presets and styles merged, checks run.

`load_story` returns a fully resolved `Story` (defaults filled in) or raises `StoryError` whose
issues each carry `file:line:col field: message`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
)

from storycli.config import ConfigFileError, Configs, ModelPreset
from storycli.story.checks import adapter_source, check_story, picture_path
from storycli.story.family import family_refusals, story_family
from storycli.story.files import MAX_STORY_BYTES, FileRefused, decode_story, read_limited
from storycli.story.schema import MAX_NAME_CHARS, CharacterSpec, IPAdapter, Loc, Story


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
        model = {**defaults, **data, **(overrides or {})}.get("model")
        preset = configs.presets.get(model) if isinstance(model, str) else None
        if preset is not None and preset.defaults:
            # defaults.yaml < the preset's defaults < the story < the command line.
            defaults = _deep_merge(defaults, preset_defaults(preset, defaults, configs))
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
    if not problems:
        # What the model's family cannot run yet, when the family is known before loading.
        family = story_family(story.model, configs, path.parent)
        problems = family_refusals(family, story)
    if problems:
        raise source.error(problems, overrides or ())
    return with_absolute_pictures(story, path.parent)


#: Keys a preset's `defaults` may not set: what names the story and its content, not settings.
NOT_PRESET_DEFAULTS = (
    "name",
    "model",
    "frames",
    "identity",
    "characters",
    "start_image",
    "ip_adapter",
)


def preset_defaults(
    preset: ModelPreset, defaults: dict[str, Any], configs: Configs
) -> dict[str, Any]:
    """A preset's `defaults`, checked as strictly as a story's keys (unknown keys, types,
    limits); raises `ConfigFileError` naming models.yaml, the preset and the key."""
    where = f"{configs.root / 'models.yaml'}: preset '{preset.name}' defaults"
    for key in preset.defaults:
        if key in NOT_PRESET_DEFAULTS:
            raise ConfigFileError(
                f"{where}.{key}: a preset's defaults hold settings (steps, guidance, ...), not "
                f"{', '.join(NOT_PRESET_DEFAULTS)}"
            )
    # Validated inside a minimal story, so each key meets the schema a story's key does.
    probe = _deep_merge(defaults, preset.defaults) | {
        "name": "preset",
        "model": preset.name,
        "frames": ["a frame"],
    }
    try:
        Story.model_validate(probe)
    except ValidationError as exc:
        loc, message = _union_issues(exc.errors(include_url=False))[0]
        raise ConfigFileError(f"{where}.{format_loc(loc)}: {message}") from None
    return preset.defaults


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
