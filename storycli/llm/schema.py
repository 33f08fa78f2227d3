"""The JSON contracts a model answers in, as pydantic models, and what the user asked for.

`StoryPlan` is what `storydiff plan` asks for; `Resolution` is what `plan --resolve` asks for.
Both are sent to the endpoint as a strict JSON schema (`strict_schema`) and checked again here
when the answer comes back: a server may ignore `response_format`, and the schema cannot say
everything (which names exist, how many frames), so `plan_problems` says the rest in words
the model can act on when it is asked again.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from storycli.story.schema import NO_CHARACTER_TAG, TAG_RE

# The story format's rule for character names (story.Story._character_names).
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9 _'.-]*")


class _Answer(BaseModel):
    # Extra keys are ignored rather than refused: small local models add them, and nothing in
    # them is used. Whitespace around strings is noise, never meaning.
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)


class PlanCharacter(_Answer):
    name: str = Field(min_length=1, description="A short first name, e.g. Mara.")
    identity: str = Field(
        min_length=1,
        description="Appearance only (face, hair, body, clothes, colours), the same in every "
        "frame; no actions, feelings or setting.",
    )


class PlanFrame(_Answer):
    prompt: str = Field(
        min_length=1,
        description="One picture: what happens, expressions, setting, light, shot. Characters "
        "by name only, never by pronoun; no appearance.",
    )
    caption: str = Field(description="One short line of narration or dialogue for the panel.")
    characters: list[str] = Field(
        default_factory=list, description="Names of the characters visible in this frame."
    )
    no_character: bool = Field(
        default=False, description="True when the frame shows none of the characters."
    )


class StoryPlan(_Answer):
    title: str | None = Field(default=None, description="A short title.")
    characters: list[PlanCharacter]
    frames: list[PlanFrame]


class Replacement(_Answer):
    frame: int = Field(description="The frame's number, 1 for the first.")
    prompt: str = Field(min_length=1, description="The frame's whole new prompt.")


class Resolution(_Answer):
    replacements: list[Replacement] = Field(
        description="Only the frames whose prompt changes; empty when none needs to."
    )


@dataclass(frozen=True)
class PlanRequest:
    """What the user asked `storydiff plan` for."""

    emotion: str | None = None
    synopsis: str | None = None
    # A fixed cast, name → appearance, in the user's order; empty: the model invents one.
    cast: dict[str, str] = field(default_factory=dict)
    frames: int = 6
    style: str | None = None
    seed: int | None = None


# ---------------------------------------------------------------------------------------------
# The schema as sent


def strict_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema in the form OpenAI's strict structured outputs accept (every
    property required, no additional properties, no defaults), with `$ref`s inlined: llama.cpp's
    and Ollama's grammar converters handle inline schemas best."""
    raw = model.model_json_schema()
    defs = raw.pop("$defs", {})

    def fix(node: Any) -> Any:
        if isinstance(node, list):
            return [fix(item) for item in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            return fix(copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]]))
        # `title` and `default` are keywords here, but property names inside `properties`.
        out = {k: fix(v) for k, v in node.items() if k not in ("title", "default", "properties")}
        if "properties" in node:
            out["properties"] = {name: fix(sub) for name, sub in node["properties"].items()}
        if out.get("type") == "object":
            out["additionalProperties"] = False
            out["required"] = list(out.get("properties", {}))
        return out

    return fix(raw)


# ---------------------------------------------------------------------------------------------
# What the schema cannot say


def mentioned(name: str, prompt: str) -> bool:
    """Whether `prompt` names `name` as a word or a tag (case-sensitive, as tags are)."""
    return name_pattern(name).search(prompt) is not None


def name_pattern(name: str) -> re.Pattern[str]:
    # `[Name]` or the bare word Name; not inside another word or another tag.
    return re.compile(rf"\[{re.escape(name)}\]|(?<![\w\[]){re.escape(name)}(?![\w\]])")


def shown_characters(frame: PlanFrame, names: list[str]) -> list[str]:
    """The characters a planned frame shows, in cast order: those listed, and those its prompt
    names (small models often name a character in the prompt and forget the list)."""
    if frame.no_character:
        return []
    return [n for n in names if n in frame.characters or mentioned(n, frame.prompt)]


def plan_problems(plan: StoryPlan, request: PlanRequest) -> list[str]:
    """Everything wrong with a schema-valid plan, one sentence each (empty: usable)."""
    problems: list[str] = []
    if len(plan.frames) != request.frames:
        problems.append(
            f"write exactly {request.frames} frames (the answer has {len(plan.frames)})"
        )
    names = [c.name for c in plan.characters]
    if not names:
        problems.append("define at least one character")
    seen: set[str] = set()
    for name in names:
        if name == NO_CHARACTER_TAG or not NAME_RE.fullmatch(name):
            problems.append(
                f"character name {name!r} is not allowed: use letters, digits, spaces, _ ' . -"
            )
        if name.casefold() in seen:
            # Tags are case-sensitive, so `Ann` and `ann` would be two look-alike characters.
            problems.append(f"character {name!r} is defined twice; give each one a distinct name")
        seen.add(name.casefold())
    if request.cast:
        missing = [n for n in request.cast if n not in names]
        extra = [n for n in names if n not in request.cast]
        if missing:
            problems.append(f"use the given characters; missing: {', '.join(missing)}")
        if extra:
            problems.append(
                f"use only the given characters ({', '.join(request.cast)}); not: "
                + ", ".join(extra)
            )
    solo = dict.fromkeys(names, 0)
    for number, frame in enumerate(plan.frames, start=1):
        unknown = [n for n in frame.characters if n not in names]
        if unknown:
            problems.append(
                f"frame {number} lists {', '.join(unknown)}, which is not a defined character "
                f"(defined: {', '.join(names)})"
            )
        if frame.no_character and frame.characters:
            problems.append(
                f"frame {number} has no_character true but lists characters; choose one"
            )
        if frame.no_character and (named := [n for n in names if mentioned(n, frame.prompt)]):
            problems.append(f"frame {number} has no_character true but its prompt names {named[0]}")
        stray = [
            t for t in TAG_RE.findall(frame.prompt) if t.strip() not in (*names, NO_CHARACTER_TAG)
        ]
        if stray or frame.prompt.count("[") != frame.prompt.count("]"):
            problems.append(f"frame {number}: do not use square brackets in prompts")
        shown = shown_characters(frame, names)
        if len(shown) == 1:
            solo[shown[0]] += 1
    for name, count in solo.items():
        if not count:
            problems.append(
                f"character {name} never appears alone in a frame; give every character at "
                "least one frame of its own (it is the character's reference picture)"
            )
    return problems
