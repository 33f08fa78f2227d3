"""`storydiff plan` and `plan --resolve` against a real HTTP server on 127.0.0.1.

The server (started here, on port 0, in a thread) speaks the chat-completions protocol and
answers from a script: valid plans, invalid ones, garbage, slow answers, HTTP errors,
refusals. Every request it receives is recorded, so the tests see exactly what storydiff sent
(headers, the schema, the retry's messages). The plan a test scripts is turned into a story
that `storydiff validate` accepts and that `storydiff generate --model tiny` renders.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_runs import run_cli

from storycli.errors import InvalidInput, RuntimeProblem
from storycli.llm.client import ChatClient, Endpoint, EndpointError, EndpointRejected
from storycli.llm.planner import MAX_RETRIES, plan_story
from storycli.llm.resolve import (
    prompt_sites,
    replacement_problem,
    resolve_story,
    substitute,
    write_resolved,
)
from storycli.llm.schema import PlanRequest, StoryPlan, strict_schema
from storycli.llm.to_story import check_story_text, story_text
from storycli.story.loader import load_story

KEY = "sk-test-Zq8Rk3DISTINCTIVE0x5f17"  # must never appear in any output
ECHO = "<the caller's key>"  # in scripted content: replaced by the request's bearer token
MARA = "a girl with short red hair and a yellow raincoat"
OLLIE = "a small grey cat with a white chest"

PLAN: dict[str, Any] = {
    "title": "A Bright Day",
    "characters": [{"name": "Mara", "identity": MARA}],
    "frames": [
        {
            "prompt": "Mara laughs as she jumps into a puddle on a sunny street",
            "caption": "Splash!",
            "characters": ["Mara"],
            "no_character": False,
        },
        {
            "prompt": "Mara dances in the warm rain, arms wide, smiling at the sky",
            "caption": "Nothing could spoil today.",
            "characters": ["Mara"],
            "no_character": False,
        },
        {
            "prompt": "a rainbow over the wet rooftops of the little town",
            "caption": "And then, a rainbow.",
            "characters": [],
            "no_character": True,
        },
    ],
}


# ---------------------------------------------------------------------------- the server


@dataclass
class Answer:
    """One scripted response, after `delay` seconds: a chat completion with `content` (or a
    `refusal`), or `status` with the raw `body` (any status, 200 included)."""

    content: str | None = None
    status: int = 200
    body: str | None = None
    refusal: str | None = None
    delay: float = 0.0


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class ScriptedLLM:
    url: str = ""
    script: list[Answer] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)

    def answer(self, *answers: Answer | dict[str, Any] | str) -> None:
        for a in answers:
            if isinstance(a, dict):
                a = Answer(content=json.dumps(a))
            elif isinstance(a, str):
                a = Answer(content=a)
            self.script.append(a)

    @property
    def base(self) -> list[str]:
        """The CLI options that point at this server."""
        return ["--llm-base-url", self.url, "--llm-model", "scripted-model"]


def _handler(llm: ScriptedLLM) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep the test output quiet
            pass

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            llm.requests.append(
                Request(self.path, {k.lower(): v for k, v in self.headers.items()}, json.loads(raw))
            )
            if self.path != "/v1/chat/completions":
                self._send(404, json.dumps({"error": {"message": "no such route"}}))
                return
            answer = llm.script.pop(0) if llm.script else Answer(status=500, body="script empty")
            time.sleep(answer.delay)
            if answer.body is not None:
                self._send(answer.status, answer.body)
                return
            content = answer.content
            if content is not None and ECHO in content:  # a server echoing the caller's key
                token = self.headers.get("Authorization", "").removeprefix("Bearer ")
                content = content.replace(ECHO, token)
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if answer.refusal is not None:
                message = {"role": "assistant", "content": None, "refusal": answer.refusal}
            reply = {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "model": "scripted-model",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            }
            self._send(200, json.dumps(reply))

        def _send(self, status: int, body: str) -> None:
            data = body.encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                pass  # the client gave up (the timeout test)

    return Handler


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "STORYDIFF_LLM_BASE_URL", "STORYDIFF_LLM_MODEL", "MY_LLM_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def llm() -> Iterator[ScriptedLLM]:
    state = ScriptedLLM()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def plan_cli(llm: ScriptedLLM, *args: str | Path, code: int = 0) -> Any:
    return run_cli("plan", "--emotion", "joyful", "--frames", "3", *llm.base, *args, code=code)


def one_error_line(result: Any) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# ------------------------------------------------------------------------------ plan: success


def test_plan_writes_a_story_that_validates(llm: ScriptedLLM, tmp_path: Path) -> None:
    llm.answer(PLAN)
    out = tmp_path / "joy.yaml"
    result = plan_cli(llm, "--out", out, "--style", "comic", "--seed", "11")
    text = out.read_text(encoding="utf-8")
    assert result.stdout == text  # the story is printed, too
    assert "wrote" in result.stderr and "storydiff generate" in result.stderr
    data = yaml.safe_load(text)
    assert data == {
        "style": "comic",
        "characters": {"Mara": MARA},
        "frames": [
            {
                "prompt": "[Mara] laughs as she jumps into a puddle on a sunny street",
                "caption": "Splash!",
            },
            {
                "prompt": "[Mara] dances in the warm rain, arms wide, smiling at the sky",
                "caption": "Nothing could spoil today.",
            },
            {
                "prompt": "[NC] a rainbow over the wet rooftops of the little town",
                "caption": "And then, a rainbow.",
            },
        ],
        "seed": 11,
        # Mara has two solo frames, fewer than the default id_length of 3.
        "consistency": {"id_length": 2},
    }
    assert text.startswith("# A Bright Day\n# Written by `storydiff plan` from emotion 'joyful'")
    run_cli("validate", out)

    # What was sent: one request, the schema as a strict JSON-schema response format and in the
    # instructions, the emotion arc in the user message, no key.
    assert len(llm.requests) == 1
    sent = llm.requests[0]
    assert sent.path == "/v1/chat/completions"
    assert "authorization" not in sent.headers
    assert sent.body["model"] == "scripted-model"
    fmt = sent.body["response_format"]
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["name"] == "story_plan"
    schema = fmt["json_schema"]["schema"]
    assert schema == strict_schema(StoryPlan)
    assert schema["required"] == ["title", "characters", "frames"]
    assert schema["additionalProperties"] is False
    frame_schema = schema["properties"]["frames"]["items"]
    assert frame_schema["required"] == ["prompt", "caption", "characters", "no_character"]
    system, user = sent.body["messages"]
    assert (
        system["role"] == "system"
        and json.dumps(schema, separators=(",", ":")) in system["content"]
    )
    assert "Write exactly 3 frames" in system["content"]
    assert user["role"] == "user" and "Emotion: joyful" in user["content"]
    assert "arc of scenes" in user["content"] and "'comic' style" in user["content"]


def test_plan_json_prints_the_parsed_plan(llm: ScriptedLLM, tmp_path: Path) -> None:
    # A server without schema enforcement: the JSON comes in a fence after a sentence.
    llm.answer(Answer(content="Here is your story:\n```json\n" + json.dumps(PLAN) + "\n```"))
    result = plan_cli(llm, "--json")
    record = json.loads(result.stdout)
    assert record["schema_version"] == 1
    assert record["out"] is None
    assert record["plan"] == StoryPlan.model_validate(PLAN).model_dump()
    assert list(tmp_path.iterdir()) == []


def test_fixed_cast_and_synopsis(llm: ScriptedLLM, tmp_path: Path) -> None:
    plan = {
        "title": "Stowaway",
        # The model paraphrased Mara's look: the user's words win in the story.
        "characters": [
            {"name": "Mara", "identity": "a redhead"},
            {"name": "Ollie", "identity": OLLIE},
        ],
        "frames": [
            {"prompt": "Mara packs her satchel", "caption": "Ready.", "characters": ["Mara"]},
            # Named in the prompt but not listed: still shown (small models forget lists).
            {"prompt": "Ollie sneaks into the satchel", "caption": "Shh.", "characters": []},
            {
                "prompt": "on the train Mara finds Ollie in the satchel",
                "caption": "Stowaway!",
                "characters": ["Mara", "Ollie"],
            },
        ],
    }
    llm.answer(plan)
    out = tmp_path / "stowaway.yaml"
    plan_cli(
        llm,
        "--synopsis",
        "a girl finds her cat in her bag",
        "--characters",
        f"Mara: {MARA}",
        "--characters",
        f"Ollie: {OLLIE}",
        "--out",
        out,
    )
    story = load_story(out)
    assert story.characters == {"Mara": MARA, "Ollie": OLLIE}
    assert [f.prompt for f in story.frames] == [
        "[Mara] packs her satchel",
        "[Ollie] sneaks into the satchel",
        "on the train [Mara] finds [Ollie] in the satchel",
    ]
    assert story.consistency.id_length == 1
    user = llm.requests[0].body["messages"][1]["content"]
    assert "a girl finds her cat in her bag" in user
    assert f"- Mara: {MARA}" in user and f"- Ollie: {OLLIE}" in user


# ------------------------------------------------------------------------------ plan: retries


def test_invalid_then_valid_retries_once_with_the_problem(llm: ScriptedLLM, tmp_path: Path) -> None:
    bad = json.loads(json.dumps(PLAN))
    bad["frames"][1]["characters"] = ["Bob"]
    llm.answer(bad, PLAN)
    out = tmp_path / "joy.yaml"
    plan_cli(llm, "--out", out)
    assert len(llm.requests) == 2  # exactly one retry
    first, second = (r.body["messages"] for r in llm.requests)
    problem = "frame 2 lists Bob, which is not a defined character (defined: Mara)"
    assert not any(problem in m["content"] for m in first)
    assert second[: len(first)] == first
    assert second[-2] == {"role": "assistant", "content": json.dumps(bad)}
    assert second[-1]["role"] == "user" and problem in second[-1]["content"]
    run_cli("validate", out)


def test_schema_error_is_sent_back_through_the_functions(llm: ScriptedLLM) -> None:
    missing = {"title": "x", "characters": PLAN["characters"]}  # no frames
    llm.answer(missing, PLAN)
    with ChatClient(Endpoint(llm.url, "scripted-model", timeout=5)) as chat:
        planned = plan_story(chat, PlanRequest(emotion="joyful", frames=3, seed=1))
    assert planned.plan == StoryPlan.model_validate(PLAN)
    check_story_text(planned.text)
    retry = llm.requests[1].body["messages"][-1]["content"]
    assert "the JSON does not match the schema: frames: Field required" in retry


def test_garbage_three_times_is_one_error_and_writes_nothing(
    llm: ScriptedLLM, tmp_path: Path
) -> None:
    llm.answer("Sure! Here is a joyful story about a dog.", "{not json", '{"frames": 3}')
    out = tmp_path / "joy.yaml"
    result = plan_cli(llm, "--out", out, code=1)
    line = one_error_line(result)
    assert "no usable story plan in 3 answers" in line
    assert "does not match the schema" in line  # the last problem
    assert len(llm.requests) == 1 + MAX_RETRIES == 3
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert result.stdout == ""


# ------------------------------------------------------------------------------ plan: failures


def test_slow_endpoint_times_out(llm: ScriptedLLM, tmp_path: Path) -> None:
    llm.answer(Answer(content=json.dumps(PLAN), delay=1.5))
    out = tmp_path / "joy.yaml"
    started = time.monotonic()
    result = plan_cli(llm, "--out", out, "--llm-timeout", "0.2", code=1)
    assert time.monotonic() - started < 1.4
    line = one_error_line(result)
    assert "did not answer within 0.2 s" in line and "--llm-timeout" in line
    assert not out.exists()


def test_unreachable_endpoint(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    out = tmp_path / "joy.yaml"
    result = run_cli(
        "plan",
        "--emotion",
        "joyful",
        "--llm-base-url",
        url,
        "--llm-model",
        "m",
        "--out",
        out,
        code=1,
    )
    line = one_error_line(result)
    assert f"cannot reach the LLM endpoint {url}/chat/completions" in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("status", "body", "code", "expected"),
    [
        (500, "upstream exploded", 1, "answered HTTP 500 Internal Server Error: upstream exploded"),
        (
            404,
            json.dumps({"error": {"message": "model 'scripted-model' not found"}}),
            2,
            "HTTP 404 Not Found: model 'scripted-model' not found; check --llm-base-url",
        ),
        (429, json.dumps({"error": "rate limited"}), 1, "HTTP 429 Too Many Requests: rate limited"),
    ],
)
def test_http_errors(
    llm: ScriptedLLM, tmp_path: Path, status: int, body: str, code: int, expected: str
) -> None:
    llm.answer(Answer(status=status, body=body))
    out = tmp_path / "joy.yaml"
    result = plan_cli(llm, "--out", out, code=code)
    assert expected in one_error_line(result)
    assert len(llm.requests) == 1  # an HTTP error is not retried
    assert not out.exists()


def test_refusal(llm: ScriptedLLM, tmp_path: Path) -> None:
    llm.answer(Answer(refusal="I can't help with that."))
    result = plan_cli(llm, "--out", tmp_path / "joy.yaml", code=1)
    assert "refused: I can't help with that." in one_error_line(result)
    assert list(tmp_path.iterdir()) == []


def test_not_a_chat_completion(llm: ScriptedLLM) -> None:
    llm.answer(Answer(body="<html>hello</html>"))  # HTTP 200, but not a chat completion
    result = plan_cli(llm, code=1)
    assert "is not a chat completion" in one_error_line(result)


# ---------------------------------------------------------------------------------- the key


def test_key_is_sent_as_bearer_and_never_printed(
    llm: ScriptedLLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    llm.answer(PLAN)
    out = tmp_path / "joy.yaml"
    ok = plan_cli(llm, "--out", out, "-v")
    assert llm.requests[0].headers["authorization"] == f"Bearer {KEY}"
    assert KEY not in json.dumps(llm.requests[0].body)  # only in the header
    assert KEY not in ok.stdout + ok.stderr
    assert KEY not in out.read_text(encoding="utf-8")
    llm.answer(PLAN)
    as_json = plan_cli(llm, "--json", "-v")
    assert KEY not in as_json.stdout + as_json.stderr

    # A server that echoes the wrong key in its error: redacted, with a hint, exit 2.
    echo = json.dumps({"error": {"message": f"Incorrect API key provided: {KEY}"}})
    llm.answer(Answer(status=401, body=echo))
    failed = plan_cli(llm, "--out", tmp_path / "other.yaml", "-v", code=2)
    assert KEY not in failed.stdout + failed.stderr
    assert "Incorrect API key provided: ***" in failed.stderr
    assert "check the API key in $OPENAI_API_KEY" in failed.stderr

    # The same through the functions: the exception text is redacted too.
    llm.answer(Answer(status=401, body=echo))
    with (
        ChatClient(Endpoint(llm.url, "m", api_key=KEY, timeout=5)) as chat,
        pytest.raises(EndpointRejected) as caught,
    ):
        plan_story(chat, PlanRequest(emotion="joyful", frames=3))
    assert KEY not in str(caught.value) and KEY not in repr(chat.endpoint)


def test_key_from_another_variable(
    llm: ScriptedLLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Named but unset: a clear error before any request.
    result = plan_cli(llm, "--llm-key-env", "MY_LLM_KEY", code=2)
    assert "MY_LLM_KEY is not set" in one_error_line(result)
    assert llm.requests == []
    monkeypatch.setenv("MY_LLM_KEY", KEY)
    llm.answer(PLAN)
    ok = plan_cli(llm, "--llm-key-env", "MY_LLM_KEY")
    assert llm.requests[0].headers["authorization"] == f"Bearer {KEY}"
    assert KEY not in ok.stdout + ok.stderr


def test_without_httpx(llm: ScriptedLLM, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "httpx", None)  # `import httpx` raises ImportError
    result = plan_cli(llm, "--out", tmp_path / "joy.yaml", code=1)
    assert "pip install 'storydiff[llm]'" in one_error_line(result)
    assert llm.requests == [] and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ option errors


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--llm-model", "m"], "give --emotion, --synopsis or both"),
        (["--emotion", "joyful"], "give --llm-model"),
        (["--emotion", "joyful", "--llm-model", "m", "--write"], "--write goes with --resolve"),
        (["--emotion", "joyful", "--llm-model", "m", "--style", "nope"], "--style nope: choose"),
        (["--emotion", "joyful", "--llm-model", "m", "--characters", "Mara"], "'Name: appearance'"),
        (
            [
                "--emotion",
                "x",
                "--llm-model",
                "m",
                "--frames",
                "1",
                "--characters",
                "A: a",
                "--characters",
                "B: b",
            ],
            "--frames 1 is too few for 2 characters",
        ),
        (
            ["--emotion", "x", "--llm-model", "m", "--llm-base-url", "ftp://x/v1"],
            "not an http(s) URL",
        ),
        (
            ["--resolve", "story.yaml", "--emotion", "x", "--llm-model", "m"],
            "--emotion does not go with --resolve",
        ),
    ],
)
def test_option_errors_before_any_request(llm: ScriptedLLM, args: list[str], expected: str) -> None:
    if "--llm-base-url" not in args:
        args = [*args, "--llm-base-url", llm.url]
    result = run_cli("plan", *args, code=2)
    assert expected in one_error_line(result)
    assert llm.requests == []


def test_existing_out_needs_overwrite(llm: ScriptedLLM, tmp_path: Path) -> None:
    out = tmp_path / "joy.yaml"
    out.write_text("keep me\n")
    result = plan_cli(llm, "--out", out, code=2)
    assert "exists" in one_error_line(result) and "--overwrite" in result.stderr
    assert out.read_text() == "keep me\n" and llm.requests == []
    llm.answer(PLAN)
    plan_cli(llm, "--out", out, "--overwrite")
    run_cli("validate", out)


# ------------------------------------------------------------------------------ the functions


def test_story_text_and_plan_problems() -> None:
    from storycli.llm.schema import plan_problems

    request = PlanRequest(emotion="joyful", frames=3, seed=3)
    plan = StoryPlan.model_validate(PLAN)
    assert plan_problems(plan, request) == []
    text = story_text(plan, request)
    check_story_text(text)
    # The default seed follows from the plan: same plan, same file.
    assert story_text(plan, PlanRequest(frames=3)) == story_text(plan, PlanRequest(frames=3))

    lonely = StoryPlan.model_validate(
        {
            "characters": [{"name": "Ann", "identity": "a"}, {"name": "NC", "identity": "b"}],
            "frames": [{"prompt": "Ann and NC [wave]", "caption": "", "characters": ["Ann", "NC"]}],
        }
    )
    problems = plan_problems(lonely, request)
    assert "write exactly 3 frames (the answer has 1)" in problems
    assert "character name 'NC' is not allowed: use letters, digits, spaces, _ ' . -" in problems
    assert "frame 1: do not use square brackets in prompts" in problems
    assert any("character Ann never appears alone" in p for p in problems)
    cast = plan_problems(plan, PlanRequest(frames=3, cast={"Mara": MARA, "Ollie": OLLIE}))
    assert cast == ["use the given characters; missing: Ollie"]


# ------------------------------------------------------------------------------ rendering


def test_planned_story_renders_with_the_tiny_model(
    llm: ScriptedLLM, tmp_path: Path, one_thread: None
) -> None:
    llm.answer(PLAN)
    story = tmp_path / "joy.yaml"
    plan_cli(llm, "--out", story)
    run_cli("validate", story)
    result = run_cli("generate", story, "--model", "tiny", "--out", tmp_path / "out", "--json")
    record = json.loads(result.stdout)
    assert record["status"] == "done"
    folder = tmp_path / "out" / "joy"
    assert sorted(p.name for p in folder.glob("frame_*.png")) == [
        "frame_01.png",
        "frame_02.png",
        "frame_03.png",
    ]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert "Splash!" in json.dumps(manifest)


# ------------------------------------------------------------------------------ resolve

DRAFT = """\
# Draft: pronouns on purpose; this comment, the keys and their quoting must survive.
name: draft   # keep me
model: tiny
characters:
  Mara: "a girl with curly black hair, green scarf"
  Ollie: 'a small grey cat with a white chest'

frames:
  - "[Mara] waves goodbye at the garden gate #Off to the market!"
  - "[Ollie] sleeps on a sunny windowsill"
  - she walks down a cobbled street full of flowers
  - prompt: 'the cat jumps down and slips out of the door'
    caption: "Or does he?"   # a comment after a caption
  - {prompt: "[NC] a busy market square, colourful awnings", caption: Market day.}
  - prompt: >
      she finds him hiding
      in her satchel
    caption: Stowaway!
seed:    7
consistency: {id_length: 1}
"""

RESOLUTION = {
    "replacements": [
        {"frame": 3, "prompt": "[Mara] walks down a cobbled street full of flowers"},
        {"frame": 4, "prompt": "[Ollie] jumps down and slips out of the door"},
        {"frame": 6, "prompt": "[Mara] finds [Ollie] hiding in her satchel"},
        {"frame": 2, "prompt": "[Ollie] sleeps on a sunny windowsill"},  # unchanged: ignored
    ]
}

RESOLVED = (
    DRAFT.replace(
        "  - she walks down a cobbled street full of flowers\n",
        '  - "[Mara] walks down a cobbled street full of flowers"\n',
    )
    .replace(
        "'the cat jumps down and slips out of the door'",
        "'[Ollie] jumps down and slips out of the door'",
    )
    .replace(
        ">\n      she finds him hiding\n      in her satchel\n",
        '"[Mara] finds [Ollie] hiding in her satchel"\n',
    )
)


@pytest.fixture
def draft(tmp_path: Path) -> Path:
    path = tmp_path / "draft.yaml"
    path.write_bytes(DRAFT.encode("utf-8"))
    return path


def test_resolve_shows_a_diff_and_changes_nothing(llm: ScriptedLLM, draft: Path) -> None:
    llm.answer(RESOLUTION)
    result = run_cli("plan", "--resolve", draft, *llm.base)
    assert draft.read_bytes() == DRAFT.encode()  # without --write nothing changes
    assert not draft.with_name("draft.yaml.bak").exists()
    diff = result.stdout
    assert diff.startswith(f"--- {draft} (before)\n+++ {draft} (resolved)\n")
    assert "-  - she walks down a cobbled street full of flowers\n" in diff
    assert '+  - "[Mara] walks down a cobbled street full of flowers"\n' in diff
    assert "+  - prompt: '[Ollie] jumps down and slips out of the door'\n" in diff
    assert '+  - prompt: "[Mara] finds [Ollie] hiding in her satchel"\n' in diff
    assert "3 prompt(s) would change; nothing written: add --write" in result.stderr

    # What the model was asked: the cast as tags, the frames numbered, the schema.
    body = llm.requests[0].body
    assert body["response_format"]["json_schema"]["name"] == "reference_resolution"
    assert body["response_format"]["json_schema"]["strict"] is True
    user = body["messages"][1]["content"]
    assert "- [Mara]: a girl with curly black hair, green scarf" in user
    assert "3. she walks down a cobbled street full of flowers" in user
    assert "6. she finds him hiding in her satchel" in user


def test_resolve_write_keeps_everything_else_byte_identical(llm: ScriptedLLM, draft: Path) -> None:
    llm.answer(RESOLUTION)
    result = run_cli("plan", "--resolve", draft, *llm.base, "--write")
    assert "wrote" in result.stderr and "draft.yaml.bak" in result.stderr
    new = draft.read_bytes()
    assert new == RESOLVED.encode()
    assert draft.with_name("draft.yaml.bak").read_bytes() == DRAFT.encode()
    # Outside the three prompt scalars, every byte is the original's: split the original at
    # those scalars, and the new file is the same pieces with only the scalars between them new.
    spans = [(site.start, site.end) for site in prompt_sites(DRAFT) if site.frame in (2, 3, 5)]
    edges = [0, *(i for span in spans for i in span), len(DRAFT)]
    outside = [DRAFT[edges[i] : edges[i + 1]] for i in range(0, len(edges), 2)]
    match = re.fullmatch("(.*?)".join(re.escape(piece) for piece in outside), new.decode(), re.S)
    assert match is not None
    assert match.groups() == (
        '"[Mara] walks down a cobbled street full of flowers"',
        "'[Ollie] jumps down and slips out of the door'",
        '"[Mara] finds [Ollie] hiding in her satchel"\n',
    )
    story = load_story(draft)
    assert [f.prompt for f in story.frames][2:6] == [
        "[Mara] walks down a cobbled street full of flowers",
        "[Ollie] jumps down and slips out of the door",
        "[NC] a busy market square, colourful awnings",
        "[Mara] finds [Ollie] hiding in her satchel",
    ]
    run_cli("validate", draft)


def test_resolve_write_never_overwrites_an_earlier_backup(llm: ScriptedLLM, draft: Path) -> None:
    earlier = draft.with_name("draft.yaml.bak")
    earlier.write_text("an earlier backup\n", encoding="utf-8")
    llm.answer(RESOLUTION)
    result = run_cli("plan", "--resolve", draft, *llm.base, "--write")
    assert "draft.yaml.bak.1" in result.stderr
    assert earlier.read_text(encoding="utf-8") == "an earlier backup\n"
    assert draft.with_name("draft.yaml.bak.1").read_bytes() == DRAFT.encode()
    assert draft.read_bytes() == RESOLVED.encode()


def test_resolve_retries_a_replacement_that_changes_the_meaning(
    llm: ScriptedLLM, draft: Path
) -> None:
    bad = {
        "replacements": [
            {"frame": 3, "prompt": "[Bob] walks down a cobbled street full of flowers"},
            {"frame": 4, "prompt": "[Ollie] chases a dragon out of the door"},
            {"frame": 5, "prompt": "[NC] [Mara] in a busy market square, colourful awnings"},
        ]
    }
    llm.answer(bad, RESOLUTION)
    with ChatClient(Endpoint(llm.url, "m", timeout=5)) as chat:
        result = resolve_story(chat, draft)
    assert result.new_text == RESOLVED
    assert sorted(result.changes) == [2, 3, 5]
    retry = llm.requests[1].body["messages"][-1]["content"]
    assert "frame 3: [Bob] is not a character of this story (tags: [Mara], [Ollie])" in retry
    assert "frame 4: change only the references; these words are new: chases, dragon" in retry
    assert "frame 5: an [NC] frame shows no character" in retry
    assert draft.read_bytes() == DRAFT.encode()  # resolve_story never writes
    backup = write_resolved(result)
    assert draft.read_bytes() == RESOLVED.encode() and backup.read_bytes() == DRAFT.encode()


def test_resolve_nothing_to_do(llm: ScriptedLLM, draft: Path, tmp_path: Path) -> None:
    llm.answer({"replacements": []})
    result = run_cli("plan", "--resolve", draft, *llm.base, "--write", "--json")
    record = json.loads(result.stdout)
    assert record["changes"] == [] and record["written"] is False and record["diff"] == ""
    assert not draft.with_name("draft.yaml.bak").exists()

    # `identity` stories need no tags: nothing is asked.
    single = tmp_path / "single.yaml"
    single.write_text('identity: "a fox"\nframes: [she runs]\nconsistency: {id_length: 1}\n')
    asked = len(llm.requests)
    result = run_cli("plan", "--resolve", single, *llm.base)
    assert "nothing to resolve" in result.stderr and "identity" in result.stderr
    assert len(llm.requests) == asked


def test_resolve_errors(llm: ScriptedLLM, draft: Path, tmp_path: Path) -> None:
    # An invalid story is reported as such, before any request.
    broken = tmp_path / "broken.yaml"
    broken.write_text("frames:\n  - '[Zed] runs'\ncharacters: {Ann: a}\n")
    result = run_cli("plan", "--resolve", broken, *llm.base, code=2)
    assert "unknown character tag [Zed]" in result.stderr and llm.requests == []

    # Garbage three times: one error, the file untouched.
    llm.answer("no", "nope", "[]")
    result = run_cli("plan", "--resolve", draft, *llm.base, "--write", code=1)
    assert "no usable list of replacements in 3 answers" in one_error_line(result)
    assert draft.read_bytes() == DRAFT.encode()
    assert not draft.with_name("draft.yaml.bak").exists()

    # Unreachable.
    url = f"http://127.0.0.1:{free_port()}/v1"
    result = run_cli(
        "plan", "--resolve", draft, "--llm-base-url", url, "--llm-model", "m", "--write", code=1
    )
    assert "cannot reach" in one_error_line(result)
    assert draft.read_bytes() == DRAFT.encode()


def test_substitute_keeps_scalar_styles() -> None:
    text = (
        "frames:\n"
        "  - plain prompt\n"
        "  - 'single quoted # with caption'\n"
        '  - {prompt: "in flow", caption: c}\n'
    )
    new = substitute(text, prompt_sites(text), {0: "still plain", 1: "it's [A]", 2: "a, b"})
    assert new == (
        "frames:\n"
        "  - still plain\n"  # plain stays plain where it can
        "  - 'it''s [A] # with caption'\n"  # the shorthand's caption is kept
        '  - {prompt: "a, b", caption: c}\n'
    )
    assert yaml.safe_load(new)["frames"] == [
        "still plain",
        "it's [A] # with caption",
        {"prompt": "a, b", "caption": "c"},
    ]


def test_replacement_problem() -> None:
    cast = ["Mara", "Ollie"]
    assert replacement_problem("she waves", "[Mara] waves", cast) is None
    assert replacement_problem("the little girl hugs her cat", "[Mara] hugs [Ollie]", cast) is None
    assert replacement_problem("Mara pets him", "[Mara] pets [Ollie]", cast) is None
    assert (
        replacement_problem("she waves at his owner", "[Mara] waves at [Ollie]'s owner", cast)
        is None
    )
    assert "keep the tag [Ollie]" in (
        replacement_problem("[Ollie] sleeps", "[Mara] sleeps", cast) or ""
    )
    assert "keep [NC]" in (replacement_problem("[NC] a square", "a square", cast) or "")
    assert "do not add the #" in (replacement_problem("she waves", "[Mara] waves #hi", cast) or "")
    assert "too many words were removed" in (
        replacement_problem(
            "she walks along the quiet river in the dawn light", "[Mara] walks", cast
        )
        or ""
    )


def test_errors_are_the_project_classes() -> None:
    assert issubclass(EndpointError, RuntimeProblem)
    assert issubclass(EndpointRejected, InvalidInput)


# ---------------------------------------------------------------- issue 20: deadline, key, --out


def _trickler(mode: str, stop: threading.Event) -> type[BaseHTTPRequestHandler]:
    """A server that sends its answer one byte every 0.4 s: the body (mode "body") or the
    status line and headers too ("headers"). It stops by itself after ~12 s."""
    answer = json.dumps(
        {"choices": [{"message": {"role": "assistant", "content": "{}"}, "finish_reason": "stop"}]}
    ).encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    head += b"Content-Length: %d\r\n\r\n" % (len(answer) + 100)

    class Trickle(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            data = head + answer + b" " * 100
            if mode == "body":
                self.wfile.write(head)
                self.wfile.flush()
                data = data[len(head) :]
            try:
                for i in range(30):
                    if stop.is_set():
                        return
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                    time.sleep(0.4)
            except OSError:
                pass  # the client hung up

    return Trickle


@pytest.mark.parametrize("mode", ["body", "headers"])
def test_llm_timeout_is_a_deadline_for_the_whole_answer(tmp_path: Path, mode: str) -> None:
    stop = threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _trickler(mode, stop))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    out = tmp_path / "joy.yaml"
    try:
        started = time.monotonic()
        result = run_cli(
            "plan", "--emotion", "joyful", "--llm-base-url", url, "--llm-model", "m",
            "--out", out, "--llm-timeout", "1.5", code=1,
        )  # fmt: skip
        took = time.monotonic() - started
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
    # Each byte comes well within the per-read time; only a deadline for the whole answer ends
    # this before the server's own ~12 s.
    assert took < 3.5, took
    line = one_error_line(result)
    assert "did not answer within 1.5 s" in line and "gave up after 1." in line
    assert "--llm-timeout" in line
    assert not out.exists()


def test_a_key_echoed_by_the_endpoint_is_redacted_everywhere(
    llm: ScriptedLLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    echoed = json.loads(json.dumps(PLAN))
    echoed["frames"][1]["prompt"] += f" (api key {ECHO})"
    echoed["frames"][0]["caption"] = f"Splash! {ECHO}"
    echoed["title"] = f"A Bright Day {ECHO}"
    out = tmp_path / "joy.yaml"
    llm.answer(echoed)
    ok = plan_cli(llm, "--out", out)
    assert llm.requests[0].headers["authorization"] == f"Bearer {KEY}"
    text = out.read_text(encoding="utf-8")
    assert KEY not in text and KEY not in ok.stdout + ok.stderr
    assert "(api key ***)" in text and "Splash! ***" in text and ok.stdout == text
    run_cli("validate", out)
    llm.answer(echoed)
    as_json = plan_cli(llm, "--json")
    assert KEY not in as_json.stdout + as_json.stderr
    assert "Splash! ***" in json.loads(as_json.stdout)["plan"]["frames"][0]["caption"]

    # In a JSON-escaped spelling too (a key with a / is sent as \/ by some servers).
    slashed = KEY + "/x"
    monkeypatch.setenv("OPENAI_API_KEY", slashed)
    spelled = json.dumps(PLAN).replace("Splash!", "Splash! " + slashed.replace("/", "\\/"))
    llm.answer(spelled)
    again = plan_cli(llm, "--json")
    assert KEY not in again.stdout + again.stderr
    monkeypatch.setenv("OPENAI_API_KEY", KEY)

    # --resolve: the diff, --json and the written file; and an error quoting the answer.
    draft = tmp_path / "draft.yaml"
    draft.write_text(DRAFT, encoding="utf-8")
    resolution = {
        "replacements": [
            {"frame": 3, "prompt": f"[Mara] walks down a cobbled street full of flowers {ECHO}"}
        ]
    }
    llm.answer(resolution)
    diff = run_cli("plan", "--resolve", draft, *llm.base)
    assert KEY not in diff.stdout + diff.stderr and "flowers ***" in diff.stdout
    llm.answer(resolution)
    as_json = run_cli("plan", "--resolve", draft, *llm.base, "--json")
    assert KEY not in as_json.stdout + as_json.stderr and "flowers ***" in as_json.stdout
    llm.answer(resolution)
    written = run_cli("plan", "--resolve", draft, *llm.base, "--write")
    assert KEY not in written.stdout + written.stderr
    assert KEY not in draft.read_text(encoding="utf-8")
    assert "flowers ***" in draft.read_text(encoding="utf-8")
    bad = {"replacements": [{"frame": 3, "prompt": f"[{ECHO}] walks down a cobbled street"}]}
    llm.answer(bad, bad, bad)
    failed = run_cli("plan", "--resolve", draft, *llm.base, code=1)
    line = one_error_line(failed)
    assert KEY not in failed.stdout + failed.stderr and "[***] is not a character" in line


def test_unwritable_out_fails_before_any_request(
    llm: ScriptedLLM, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    out = Path("/sys/storydiff-test-plan.yaml")  # read-only even for root
    result = plan_cli(llm, "--out", out, code=2)
    line = one_error_line(result)
    assert f"--out {out}: cannot write in /sys" in line and "choose another --out" in line
    assert "Traceback" not in result.output and "Errno" not in result.output
    assert llm.requests == [] and not out.exists()

    # --resolve --write: the story's folder is checked before any request, too.
    import storycli.paths

    draft = tmp_path / "draft.yaml"
    draft.write_text(DRAFT, encoding="utf-8")
    monkeypatch.setattr(
        storycli.paths, "write_problem", lambda folder: "cannot write there: Read-only file system"
    )
    result = run_cli("plan", "--resolve", draft, *llm.base, "--write", code=2)
    assert "--resolve" in one_error_line(result) and "Read-only file system" in result.stderr
    assert llm.requests == [] and draft.read_text(encoding="utf-8") == DRAFT
