"""A plan as story YAML: characters name → identity, frames with `[Name]` tags (or `[NC]`) and
captions, the style, a seed; checked by the same code as `storydiff validate`."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import yaml

from storycli.config import Configs
from storycli.llm.schema import PlanFrame, PlanRequest, StoryPlan, name_pattern, shown_characters
from storycli.story.loader import StoryError, load_story
from storycli.story.schema import NO_CHARACTER_TAG


def tagged_prompt(frame: PlanFrame, names: list[str]) -> str:
    """The frame's prompt in the story grammar: the first mention of each shown character
    becomes its `[Name]` tag (a tag is replaced by the whole description, so one per
    character), characters shown but not named go in front, a frame without any gets `[NC]`."""
    prompt = " ".join(frame.prompt.split())
    shown = shown_characters(frame, names)
    if not shown:
        bare = prompt.removeprefix(f"[{NO_CHARACTER_TAG}]").strip()
        return f"[{NO_CHARACTER_TAG}] {bare}"
    unnamed = []
    for name in shown:
        pattern = name_pattern(name)
        match = pattern.search(prompt)
        if match is None:
            unnamed.append(f"[{name}]")
        elif match.group() != f"[{name}]":
            prompt = prompt[: match.start()] + f"[{name}]" + prompt[match.end() :]
    if unnamed:
        lead = unnamed[0] if len(unnamed) == 1 else ", ".join(unnamed[:-1]) + " and " + unnamed[-1]
        prompt = f"{lead}, {prompt}"
    return prompt


def plan_seed(plan: StoryPlan) -> int:
    """A seed that follows from the plan: the same plan gives the same file, different stories
    get different noise, and the seed is written out so the pictures can be remade."""
    digest = hashlib.sha256(json.dumps(plan.model_dump(), sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:4], "big")


class _Dumper(yaml.SafeDumper):
    """Lists indented under their key (`frames:` then `  - prompt: ...`), as the example
    stories are written; PyYAML's default puts the dashes at the key's column."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _comment(text: str, limit: int = 80) -> str:
    """`text` on one comment line (a synopsis can be a paragraph)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def story_text(plan: StoryPlan, request: PlanRequest, configs: Configs | None = None) -> str:
    """The story file for a usable plan (see `schema.plan_problems`), as YAML text."""
    configs = configs or Configs()
    names = [c.name for c in plan.characters]
    # A fixed cast's identities are the user's words, whatever the model copied.
    cast = {c.name: request.cast.get(c.name, c.identity) for c in plan.characters}
    frames: list[dict[str, Any]] = []
    solo = dict.fromkeys(names, 0)
    for frame in plan.frames:
        entry: dict[str, Any] = {"prompt": tagged_prompt(frame, names)}
        if frame.caption:
            entry["caption"] = " ".join(frame.caption.split())
        frames.append(entry)
        shown = shown_characters(frame, names)
        if len(shown) == 1:
            solo[shown[0]] += 1

    header = [f"# {_comment(plan.title)}"] if plan.title else []
    asked = []
    if request.emotion:
        asked.append(f"emotion {_comment(request.emotion)!r}")
    if request.synopsis:
        asked.append(f"synopsis {_comment(request.synopsis)!r}")
    header.append("# Written by `storydiff plan`" + (f" from {', '.join(asked)}" if asked else ""))
    header.append("# Edit freely; `storydiff validate` checks it, `storydiff generate` draws it.")
    body: dict[str, Any] = {}
    if request.style:
        body["style"] = request.style
    body["characters"] = cast
    body["frames"] = frames
    body["seed"] = request.seed if request.seed is not None else plan_seed(plan)
    # Each character's first `id_length` solo frames are its references: a short story may
    # have fewer, and then the story would not validate with the default.
    default_length = int(configs.defaults.get("consistency", {}).get("id_length", 3))
    id_length = max(1, min(default_length, *solo.values()))
    if id_length < default_length:
        body["consistency"] = {"id_length": id_length}
    parts = []
    for key, value in body.items():
        # One dump per key, so the file reads in this order with a blank line between blocks;
        # no line wrapping, so each prompt stays on one editable line.
        parts.append(
            yaml.dump(
                {key: value},
                Dumper=_Dumper,
                sort_keys=False,
                allow_unicode=True,
                width=10**6,
                indent=2,
            )
        )
    return "\n".join(header) + "\n\n" + "\n".join(parts)


def check_story_text(
    text: str, file_name: str = "story.yaml", configs: Configs | None = None
) -> None:
    """Raise `StoryError` (with `file_name` in its lines) unless `text` is a story that
    `storydiff validate` accepts: the same loading, checks and plan."""
    from storycli.keyframes.plan import build_plan

    configs = configs or Configs()
    with tempfile.TemporaryDirectory(prefix="storydiff-plan-") as folder:
        path = Path(folder) / file_name
        path.write_text(text, encoding="utf-8")
        try:
            build_plan(load_story(path, configs), configs, path.parent)
        except StoryError as exc:
            raise StoryError(file_name, exc.issues) from None
