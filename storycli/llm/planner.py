"""Ask → validate → ask again with the problem (at most twice) → a plan and its story text.

`ask_json` is the loop both `plan` and `plan --resolve` use: an answer that is not JSON, does
not match the schema, or fails the checks the schema cannot express goes back to the model with
the problem in words, so the next answer can fix exactly that.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from storycli.config import Configs
from storycli.llm.client import EndpointError, Reply
from storycli.llm.prompts import Message, plan_messages, retry_message
from storycli.llm.schema import PlanRequest, StoryPlan, plan_problems, strict_schema
from storycli.llm.to_story import check_story_text, story_text
from storycli.story.loader import StoryError

log = logging.getLogger(__name__)

MAX_RETRIES = 2  # after the first answer: three answers in all
_ANSWER_ECHO_CHARS = 8000  # how much of a rejected answer is sent back as context

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class Chat(Protocol):
    """What the planner needs of a client (`client.ChatClient`; tests may pass their own)."""

    def complete(
        self, messages: list[Message], response_format: dict[str, Any] | None = None
    ) -> Reply: ...


class InvalidAnswer(ValueError):
    """An answer that cannot be used; the message is sent back to the model."""


def response_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def extract_json(text: str | None) -> Any:
    """The JSON value in an answer. Tolerates what servers without schema enforcement add
    around it: a reasoning model's <think> block, a ```json fence, a sentence before it."""
    if not text or not text.strip():
        raise InvalidAnswer("the answer is empty; answer with the JSON object")
    body = _THINK.sub("", text).strip()
    if fence := _FENCE.search(body):
        body = fence.group(1).strip()
    elif not body.startswith("{") and "{" in body:
        body = body[body.index("{") : body.rindex("}") + 1]
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise InvalidAnswer(
            f"the answer is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None


def parse_model(model: type[M], text: str | None) -> M:
    """`text` as an instance of `model`, or InvalidAnswer listing what does not match."""
    data = extract_json(text)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False)[:10]:
            where = ".".join(str(part) for part in err["loc"]) or "the answer"
            problems.append(f"{where}: {err['msg']}")
        raise InvalidAnswer("the JSON does not match the schema: " + "; ".join(problems)) from None


def ask_json(
    chat: Chat,
    messages: list[Message],
    schema_name: str,
    schema: dict[str, Any],
    parse: Callable[[str | None], T],
    what: str,
) -> T:
    """Ask until `parse` accepts an answer, sending each rejection back (≤ MAX_RETRIES times).

    After the last rejected answer: EndpointError naming the last problem. Endpoint failures
    (unreachable, HTTP errors, refusals) are not retried: asking again would not change them.
    """
    messages = list(messages)
    fmt = response_format(schema_name, schema)
    problem = ""
    for attempt in range(1 + MAX_RETRIES):
        reply = chat.complete(messages, fmt)
        try:
            return parse(reply.content)
        except InvalidAnswer as exc:
            problem = str(exc)
            if reply.finish_reason == "length":
                problem += " (the answer was cut off at the server's length limit)"
            log.debug("answer %d rejected: %s", attempt + 1, problem)
        messages.append(
            {"role": "assistant", "content": (reply.content or "")[:_ANSWER_ECHO_CHARS]}
        )
        messages.append(retry_message(problem))
    short = problem if len(problem) <= 300 else problem[:299] + "…"
    raise EndpointError(
        f"the model gave no usable {what} in {1 + MAX_RETRIES} answers (last problem: {short}); "
        "try again, or another --llm-model"
    )


@dataclass(frozen=True)
class PlannedStory:
    plan: StoryPlan
    text: str  # the story file's text; `storydiff validate` accepts it


def plan_story(
    chat: Chat,
    request: PlanRequest,
    configs: Configs | None = None,
    file_name: str = "story.yaml",
) -> PlannedStory:
    """Ask the model for a story plan and turn it into a story file that validates."""
    configs = configs or Configs()
    schema = strict_schema(StoryPlan)

    def parse(text: str | None) -> PlannedStory:
        plan = parse_model(StoryPlan, text)
        problems = plan_problems(plan, request)
        if problems:
            raise InvalidAnswer("; ".join(problems))
        story = story_text(plan, request, configs)
        try:
            check_story_text(story, file_name, configs)
        except StoryError as exc:
            # The checks above should catch everything; if not, the model can still fix it.
            raise InvalidAnswer(
                "the story made from it is invalid: " + "; ".join(exc.lines())
            ) from None
        return PlannedStory(plan, story)

    return ask_json(chat, plan_messages(request, schema), "story_plan", schema, parse, "story plan")
