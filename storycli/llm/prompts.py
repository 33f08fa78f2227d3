"""What the model is asked: the story-writing prompt (an emotion, a synopsis, a fixed cast) and
the reference-resolution prompt.

The emotion prompt follows the course report on StoryDiffusion (shared/seeds/000): from one
emotion word, an arc of scenes with a clear emotional tone, each scene an image prompt with a
caption, which then drives the image generation. The resolution prompt follows StoryGPT-V's
observation (seeds/004) that "he", "she", "they" in a frame's text leave the picture model
guessing who is meant, while a language model reading the whole story can tell; here it writes
the answer back as the story format's `[Name]` tags.

The schema is sent both as `response_format` and in the instructions: servers that ignore
`response_format` (or support only `json_object`) still see what to write.
"""

from __future__ import annotations

import json
from typing import Any

from storycli.llm.schema import PlanRequest

Message = dict[str, str]

PLAN_SYSTEM = """\
You are a storyboard writer for a text-to-image model (SDXL) that keeps the same characters \
consistent from picture to picture. You write a short visual story as one JSON object.

Rules:
- Write exactly {frames} frames, in story order; each frame is one picture.
- characters: every character of the story, each with a name (a short first name) and an \
identity: appearance only, the same in every picture: face, hair, body, clothes and their \
colours, 10 to 25 words. No actions, feelings or places in an identity.
- frame.prompt: what the picture shows: what the characters do, their expressions and poses, \
the place, the time of day, the light and colours, the camera shot; 15 to 40 words. Refer to a \
character only by its name (for example "Mara smiles"), never by a pronoun or a description, \
and do not repeat its appearance: the identity is added automatically. No square brackets and \
no # characters.
- frame.characters: the names of the characters visible in the picture.
- frame.no_character: true for a picture without any of the characters (a landscape, an \
object, a crowd from afar); then characters is an empty list.
- Every character must appear alone in at least one frame, best early in the story: those \
frames are its reference pictures.
- frame.caption: one short sentence of narration or dialogue printed under the picture \
(at most 15 words).
- title: a short title for the story.

Answer with only the JSON object, no other text. It must match this JSON schema:
{schema}
"""

RESOLVE_SYSTEM = """\
You edit the frame prompts of a picture story so that every reference to a character names it.

In these prompts a character is written as a tag in square brackets, for example [Mara]. When \
the picture is drawn, the tag is replaced by the character's full description, and the tags \
decide which characters appear in the picture. [NC] marks a picture without characters.

Rules:
- Replace every pronoun (he, she, they, him, her, them, his, their, ...) and every vague \
reference (the girl, her friend, the cat, the two of them, ...) that means one of the \
characters with that character's tag; write a possessive as [Mara]'s. Work out who is meant \
from the earlier frames, in story order.
- A pronoun that means a character already tagged earlier in the same prompt stays as it is.
- Use only these tags: {tags}. Keep every tag a prompt already has.
- Keep every other word exactly as it is: add no content, remove nothing else, do not describe \
appearance, and do not use the # character.
- Never put a tag into an [NC] frame.
- List only the frames whose prompt changes, each with its number (1 is the first frame) and \
its whole new prompt. An empty list is the right answer when no prompt needs a change.

Answer with only the JSON object, no other text. It must match this JSON schema:
{schema}
"""


def _schema_text(schema: dict[str, Any]) -> str:
    return json.dumps(schema, separators=(",", ":"))


def plan_messages(request: PlanRequest, schema: dict[str, Any]) -> list[Message]:
    """The system and user messages that ask for a story plan."""
    parts: list[str] = []
    if request.emotion:
        parts.append(
            f"Emotion: {request.emotion}. Write a story whose pictures make the viewer feel "
            f"{request.emotion}. Build an arc of scenes: open on a situation, let the feeling "
            "grow through what happens, bring it to a peak, and end on a picture that lands it. "
            "Show the emotion in faces, gestures and actions, and in light, colour, weather and "
            "place, rather than by naming it; the captions carry it in words."
        )
    if request.synopsis:
        parts.append(f"The story: {request.synopsis}")
    if request.cast:
        lines = "\n".join(f"- {name}: {identity}" for name, identity in request.cast.items())
        parts.append(
            "Use exactly these characters, with these names and identities (copy them as "
            f"given), and no others:\n{lines}"
        )
    else:
        most = max(1, min(3, request.frames // 2))
        parts.append(
            f"Invent the characters: {'one' if most == 1 else f'1 to {most}'}, each with a "
            "distinct look."
        )
    if request.style:
        parts.append(
            f"The pictures will be drawn in the '{request.style}' style; the prompts need not "
            "mention it."
        )
    parts.append(f"Write exactly {request.frames} frames.")
    return [
        {
            "role": "system",
            "content": PLAN_SYSTEM.format(frames=request.frames, schema=_schema_text(schema)),
        },
        {"role": "user", "content": "\n\n".join(parts)},
    ]


def resolve_messages(
    cast: dict[str, str], prompts: list[str], schema: dict[str, Any]
) -> list[Message]:
    """The messages that ask for `[Name]` tags in place of pronouns and vague references."""
    tags = ", ".join(f"[{name}]" for name in cast)
    characters = "\n".join(f"- [{name}]: {description}" for name, description in cast.items())
    frames = "\n".join(f"{number}. {prompt}" for number, prompt in enumerate(prompts, start=1))
    return [
        {
            "role": "system",
            "content": RESOLVE_SYSTEM.format(tags=tags, schema=_schema_text(schema)),
        },
        {"role": "user", "content": f"Characters:\n{characters}\n\nFrames:\n{frames}"},
    ]


def retry_message(problem: str) -> Message:
    """The user message that sends a rejected answer's problem back to the model."""
    return {
        "role": "user",
        "content": f"That answer cannot be used: {problem}\n"
        "Answer again with only the corrected JSON object, matching the schema.",
    }
