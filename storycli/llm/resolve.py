"""`plan --resolve`: every pronoun or vague reference to a character becomes its `[Name]` tag.

The model answers a list of {frame, new prompt}; each is checked to keep the frame's meaning
(known tags only, the tags and `[NC]` it had, the same words apart from the references) and
then written into the original text at the location of that frame's prompt scalar, found with
PyYAML's node marks. Nothing is re-dumped: comments, key order, quoting and every other byte
stay as they were, which a YAML round trip could not promise.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from storycli.atomic import atomic_write_bytes
from storycli.config import Configs
from storycli.errors import InvalidInput, RuntimeProblem
from storycli.llm.planner import Chat, InvalidAnswer, ask_json, parse_model
from storycli.llm.prompts import resolve_messages
from storycli.llm.schema import Resolution, strict_schema
from storycli.story.loader import StoryError, load_story
from storycli.story.schema import NO_CHARACTER_TAG, TAG_RE

# Words a resolution may add or drop besides tags: the references themselves and the glue
# around a tag ("[Mara]'s", "[Mara] and [Ollie]").
_REFERENCE_WORDS = frozenset(
    """he she they him her them his hers their theirs himself herself themselves it its itself
    we us our you your i me my the a an this that these those s and both two of""".split()  # noqa: SIM905
)
_MAX_DROPPED_FRACTION = 0.5  # a vague reference ("the old man with the hat") drops words


# ---------------------------------------------------------------------------------------------
# Where each frame's prompt is in the text


@dataclass(frozen=True)
class PromptSite:
    """One frame's prompt scalar in the file's text."""

    frame: int  # 0-based
    start: int  # character offsets of the scalar in the text (quotes included)
    end: int
    style: str | None  # PyYAML's scalar style: None (plain), "'", '"', "|", ">"
    value: str  # the scalar's value as loaded
    shorthand: bool  # a `"prompt #caption"` string rather than a mapping's `prompt:`
    in_flow: bool  # inside [...] or {...}: plain scalars there cannot hold , [ ] { }

    @property
    def prompt(self) -> str:
        """The frame's prompt, as the story format reads it from the scalar."""
        if not self.shorthand:
            return self.value
        prompt, sep, _ = self.value.rpartition("#")
        return prompt.strip() if sep else self.value.strip()

    def with_prompt(self, new: str) -> str:
        """The scalar's new value: for the shorthand, the caption and spacing are kept."""
        if not self.shorthand:
            return new
        before, sep, after = self.value.rpartition("#")
        if not sep:
            before, after = self.value, ""
        lead = before[: len(before) - len(before.lstrip())]
        trail = before[len(before.rstrip()) :]
        return lead + new + trail + sep + after


def prompt_sites(text: str) -> list[PromptSite]:
    """The prompt scalar of every frame, in frame order (the story must have loaded)."""
    # The pure-Python composer: its marks are character offsets into `text`.
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    frames = None
    if isinstance(root, yaml.MappingNode):
        for key, value in root.value:
            if isinstance(key, yaml.ScalarNode) and key.value == "frames":
                frames = value
    if not isinstance(frames, yaml.SequenceNode):
        raise InvalidInput("the story's `frames` is not a list that can be edited in place")
    sites = []
    for i, item in enumerate(frames.value):
        in_flow = bool(frames.flow_style)
        node, shorthand = item, True
        if isinstance(item, yaml.MappingNode):
            shorthand, in_flow = False, in_flow or bool(item.flow_style)
            node = next(
                (
                    v
                    for k, v in item.value
                    if isinstance(k, yaml.ScalarNode) and k.value == "prompt"
                ),
                None,
            )
        if not isinstance(node, yaml.ScalarNode):
            raise InvalidInput(f"frame {i + 1}'s prompt is not a plain text value; edit it by hand")
        sites.append(
            PromptSite(
                frame=i,
                start=node.start_mark.index,
                end=node.end_mark.index,
                style=node.style,
                value=node.value,
                shorthand=shorthand,
                in_flow=in_flow,
            )
        )
    return sites


def _plain_ok(value: str, in_flow: bool) -> bool:
    if in_flow or not value or value != value.strip() or "\n" in value:
        return False
    try:
        return yaml.safe_load(f"key: {value}\n") == {"key": value}
    except yaml.YAMLError:
        return False


def render_scalar(site: PromptSite, value: str, original: str) -> str:
    """`value` written as YAML in the site's own quoting where it can hold it (plain stays
    plain, single stays single), else double-quoted. `original` is the scalar's old text."""
    if site.style is None and _plain_ok(value, site.in_flow):
        return value
    if site.style == "'" and "\n" not in value:
        return "'" + value.replace("'", "''") + "'"
    quoted = json.dumps(value, ensure_ascii=False)  # a JSON string is a YAML double-quoted one
    if site.style in ("|", ">"):
        # A block scalar's region runs to its last line break: keep those, so the next key
        # stays on its own line.
        stripped = original.rstrip()
        return quoted + original[len(stripped) :]
    return quoted


def substitute(text: str, sites: list[PromptSite], prompts: dict[int, str]) -> str:
    """`text` with the prompts of the frames in `prompts` (0-based) replaced; every byte
    outside those scalars is kept."""
    out = text
    for site in sorted((s for s in sites if s.frame in prompts), key=lambda s: -s.start):
        original = out[site.start : site.end]
        new = render_scalar(site, site.with_prompt(prompts[site.frame]), original)
        out = out[: site.start] + new + out[site.end :]
    return out


# ---------------------------------------------------------------------------------------------
# Checking the model's replacements


def _words(prompt: str, names: list[str]) -> list[str]:
    """A prompt's words without tags, for comparing content (a character's bare name counts as
    a reference: "Mara" may become "[Mara]")."""
    lowered = {n.casefold() for n in names}
    return [w for w in re.findall(r"\w+", TAG_RE.sub(" ", prompt).casefold()) if w not in lowered]


def replacement_problem(old: str, new: str, cast: list[str]) -> str | None:
    """Why `new` does not keep `old`'s meaning, or None when it only names references."""
    old_tags = {t.strip() for t in TAG_RE.findall(old)}
    new_tags = {t.strip() for t in TAG_RE.findall(new)}
    unknown = sorted(new_tags - {*cast, NO_CHARACTER_TAG})
    if unknown:
        return (
            f"[{unknown[0]}] is not a character of this story (tags: "
            + ", ".join(f"[{n}]" for n in cast)
            + ")"
        )
    if new.count("#") > old.count("#"):
        # In a `"prompt #caption"` frame the last # starts the caption.
        return "do not add the # character"
    if (NO_CHARACTER_TAG in old_tags) != (NO_CHARACTER_TAG in new_tags):
        return f"keep [{NO_CHARACTER_TAG}] exactly where it was (a frame without characters)"
    if NO_CHARACTER_TAG in new_tags and new_tags - {NO_CHARACTER_TAG}:
        return f"an [{NO_CHARACTER_TAG}] frame shows no character; put no tag into it"
    if dropped := sorted(old_tags - new_tags):
        return f"keep the tag [{dropped[0]}] the prompt had"
    before, after = _words(old, cast), _words(new, cast)
    matcher = difflib.SequenceMatcher(a=before, b=after, autojunk=False)
    added, removed = [], []
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op in ("replace", "insert"):
            added += [w for w in after[b0:b1] if w not in _REFERENCE_WORDS]
        if op in ("replace", "delete"):
            removed += [w for w in before[a0:a1] if w not in _REFERENCE_WORDS]
    if added:
        return "change only the references; these words are new: " + ", ".join(added[:5])
    if len(removed) > max(4, _MAX_DROPPED_FRACTION * len(before)):
        return "change only the references; too many words were removed: " + ", ".join(removed[:5])
    return None


def resolution_changes(
    resolution: Resolution, prompts: list[str], cast: list[str]
) -> dict[int, str]:
    """The accepted changes, frame (0-based) → new prompt; InvalidAnswer listing every problem."""
    problems: list[str] = []
    changes: dict[int, str] = {}
    seen: set[int] = set()
    for item in resolution.replacements:
        number = item.frame
        if not 1 <= number <= len(prompts):
            problems.append(f"frame {number} does not exist (the story has {len(prompts)} frames)")
            continue
        if number in seen:
            problems.append(f"frame {number} is listed twice")
            continue
        seen.add(number)
        new = " ".join(item.prompt.split())
        old = prompts[number - 1]
        if new == old:
            continue
        if problem := replacement_problem(old, new, cast):
            problems.append(f"frame {number}: {problem}")
        else:
            changes[number - 1] = new
    if problems:
        raise InvalidAnswer("; ".join(problems))
    return changes


# ---------------------------------------------------------------------------------------------
# The command's work


@dataclass
class Resolved:
    path: Path
    old_text: str
    new_text: str
    # frame (0-based) → (old prompt, new prompt)
    changes: dict[int, tuple[str, str]] = field(default_factory=dict)
    note: str | None = None  # why nothing was asked, when nothing was

    @property
    def diff(self) -> str:
        return unified_diff(self.old_text, self.new_text, self.path)


def unified_diff(old: str, new: str, path: Path) -> str:
    return "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True),
            new.splitlines(keepends=True),
            fromfile=f"{path} (before)",
            tofile=f"{path} (resolved)",
        )
    )


def _read(path: Path) -> str:
    try:
        # Bytes, then decode: universal-newline reading would turn \r\n into \n, and the file
        # must come back byte for byte.
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read {path}: {exc}") from None


def _check_new_text(
    path: Path,
    old: str,
    new: str,
    sites: list[PromptSite],
    changes: dict[int, str],
    configs: Configs,
) -> None:
    """The edited text must load as the old data with exactly those prompts changed, and
    still be a valid story; else nothing may be written."""
    expected = yaml.safe_load(old)
    for site in sites:
        if site.frame in changes:
            frame = expected["frames"][site.frame]
            value = site.with_prompt(changes[site.frame])
            if site.shorthand:
                expected["frames"][site.frame] = value
            else:
                frame["prompt"] = value
    try:
        loaded = yaml.safe_load(new)
    except yaml.YAMLError:
        loaded = None
    if loaded != expected:
        raise RuntimeProblem(
            f"could not edit {path}'s prompts in place without changing anything else; nothing "
            "was written (edit the prompts by hand)"
        )
    # Validated next to the original, so pictures named relative to the story still resolve.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        tmp.write_text(new, encoding="utf-8", newline="")
    except OSError:
        tmp = None
    try:
        if tmp is not None:
            load_story(tmp, configs)
    except StoryError as exc:
        first = exc.lines()[0].replace(str(tmp), str(path))
        raise InvalidInput(
            f"with the references named, the story would be invalid ({first}); nothing was written"
        ) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


def resolve_story(chat: Chat, path: Path | str, configs: Configs | None = None) -> Resolved:
    """Ask the model to name every reference in `path`'s prompts; the edit, not yet written."""
    path = Path(path)
    configs = configs or Configs()
    story = load_story(path, configs)  # StoryError: fix the story first
    text = _read(path)
    if story.characters is None:
        # `identity` prepends the one character to every frame: nothing is ambiguous.
        return Resolved(
            path, text, text, note="the story uses `identity`: every frame already shows it"
        )
    cast = list(story.characters)
    sites = prompt_sites(text)
    if [site.prompt for site in sites] != [frame.prompt for frame in story.frames]:
        raise InvalidInput(f"{path}: the frames' prompts could not be located in the text")
    # As the model sees them and as changes are compared: a block scalar's line breaks and
    # indentation are layout, not words.
    prompts = [" ".join(site.prompt.split()) for site in sites]
    schema = strict_schema(Resolution)

    def parse(answer: str | None) -> dict[int, str]:
        return resolution_changes(parse_model(Resolution, answer), prompts, cast)

    changes = ask_json(
        chat,
        resolve_messages(story.cast, prompts, schema),
        "reference_resolution",
        schema,
        parse,
        "list of replacements",
    )
    if not changes:
        return Resolved(path, text, text)
    new_text = substitute(text, sites, changes)
    _check_new_text(path, text, new_text, sites, changes, configs)
    return Resolved(path, text, new_text, {i: (prompts[i], new) for i, new in changes.items()})


def backup_path(path: Path) -> Path:
    """`<file>.bak`, or `<file>.bak.N` beside earlier backups: none is ever overwritten."""
    backup, n = path.with_name(path.name + ".bak"), 0
    while backup.exists():
        n += 1
        backup = path.with_name(f"{path.name}.bak.{n}")
    return backup


def write_resolved(result: Resolved) -> Path:
    """Write the edited story atomically, the original first to `<file>.bak`; the backup."""
    path, backup = result.path, backup_path(result.path)
    if _read(path) != result.old_text:
        raise InvalidInput(f"{path} changed while the model was answering; run again")
    mode = path.stat().st_mode & 0o7777
    try:
        atomic_write_bytes(backup, result.old_text.encode("utf-8"))
        atomic_write_bytes(path, result.new_text.encode("utf-8"))
        os.chmod(path, mode)  # a new file gets default permissions; keep the story's own
    except OSError as exc:
        raise RuntimeProblem(f"cannot write {path}: {exc.strerror or exc}") from None
    return backup


def describe(result: Resolved) -> dict[str, Any]:
    """The changes as JSON (frames 1-based, as in messages)."""
    return {
        "file": str(result.path),
        "changes": [
            {"frame": i + 1, "old": old, "new": new}
            for i, (old, new) in sorted(result.changes.items())
        ],
    }
