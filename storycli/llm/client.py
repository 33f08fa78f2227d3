"""One chat-completions call to an OpenAI-compatible endpoint (llama.cpp server, Ollama, vLLM,
a hosted API), with every failure turned into one sentence.

httpx is imported only here and only when a client is made, so storydiff works without it
until `storydiff plan` is used. The API key lives in `Endpoint.api_key` (never in its repr),
goes out only as the `Authorization: Bearer` header, and is cut out of every message this
module raises: servers like to echo a wrong key back in their error text.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from storycli.errors import InvalidInput, RuntimeProblem

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://127.0.0.1:8080/v1"  # llama.cpp's server; local, so nothing leaks
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
DEFAULT_TIMEOUT = 120.0  # seconds; a local 7B model writing a whole plan on a CPU takes a while
INSTALL_HINT = "pip install 'storydiff[llm]'"
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_DETAIL_CHARS = 200


class EndpointError(RuntimeProblem):
    """The endpoint could not be reached, timed out, failed or refused (exit 1)."""


class EndpointRejected(InvalidInput):
    """The endpoint refused the request as given: a wrong key, model or URL (HTTP 4xx, exit 2)."""


def redact(text: str, secret: str | None) -> str:
    """`text` with every occurrence of `secret` replaced by `***`; also as a JSON string
    spells it (a model's answer is JSON text: `/` may come as `\\/`, `"` as `\\"`)."""
    if not secret:
        return text
    text = text.replace(secret, "***")
    for spelled in {json.dumps(secret)[1:-1], secret.replace("/", "\\/")} - {secret}:
        text = text.replace(spelled, "***")
    return text


def check_base_url(url: str) -> str:
    """The base URL without a trailing slash, or InvalidInput naming the expected form."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(
            f"--llm-base-url {url!r} is not an http(s) URL; give the server's OpenAI-compatible "
            f"base, e.g. {DEFAULT_BASE_URL}"
        )
    return url.strip().rstrip("/")


def key_from_env(name: str, required: bool) -> str | None:
    """The API key in environment variable `name`. An unset default variable means no key
    (local servers need none); an unset variable the user named is a mistake worth saying."""
    key = os.environ.get(name, "").strip()
    if key:
        return key
    if required:
        raise InvalidInput(f"--llm-key-env {name}: the environment variable {name} is not set")
    return None


@dataclass(frozen=True)
class Endpoint:
    """Where and how to ask: an OpenAI-compatible base URL (…/v1), a model name, a key."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    timeout: float = DEFAULT_TIMEOUT
    key_env: str = DEFAULT_KEY_ENV  # named in hints about a refused key

    @property
    def url(self) -> str:
        """The chat-completions URL: the base's path + /chat/completions (a base that already
        names it is taken as it is; a query, e.g. Azure's api-version, stays a query)."""
        parts = urlsplit(self.base_url)
        path = parts.path.rstrip("/")
        if not path.endswith("/chat/completions"):
            path += "/chat/completions"
        return urlunsplit(parts._replace(path=path))

    @property
    def shown(self) -> str:
        """The URL as printed: without user:password@ or a query, which may hold secrets."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        if parts.port:
            netloc += f":{parts.port}"
        return redact(urlunsplit((parts.scheme, netloc, parts.path, "", "")), self.api_key)


@dataclass(frozen=True)
class Reply:
    """The assistant message's text (None when the server sent none) and why it stopped."""

    content: str | None
    finish_reason: str | None


class _Late(Exception):
    """The whole answer did not arrive within the endpoint's timeout."""


class ChatClient:
    """A chat-completions client for one endpoint; use as a context manager or `close()`.

    `Endpoint.timeout` is a deadline for each whole request (connect, headers, body): httpx's
    own timeout is per read, which a server sending a byte every few seconds never trips.
    """

    def __init__(self, endpoint: Endpoint, transport: Any = None) -> None:
        try:
            import httpx
        except ImportError:
            raise RuntimeProblem(
                f"`storydiff plan` talks to the model through httpx, which is not installed: "
                f"{INSTALL_HINT}"
            ) from None
        self.endpoint = endpoint
        self._httpx = httpx
        headers = {"Accept": "application/json"}
        if endpoint.api_key:
            headers["Authorization"] = f"Bearer {endpoint.api_key}"
        host = urlsplit(endpoint.url).hostname or ""
        self._http = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(endpoint.timeout),
            # A proxy set for the internet (HTTP_PROXY) must not capture a server on this machine.
            trust_env=host not in _LOOPBACK,
            transport=transport,
        )
        self._lock = threading.Lock()
        self._running = False  # a request's thread still reads (one given up on, after close)
        self._closing = False

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            busy = self._running
        if not busy:
            # A request given up on still reads on its thread; closing its socket under it
            # is unsafe, so that thread closes the client when its read ends.
            self._http.close()

    def _post(self, body: dict[str, Any]) -> Any:
        """POST `body`, the whole response read within `Endpoint.timeout` seconds in all, or
        `_Late`. The request runs on a daemon thread the deadline does not wait for; it also
        stops reading at the deadline, so it ends within one more read."""
        httpx, url = self._httpx, self.endpoint.url
        deadline = time.monotonic() + self.endpoint.timeout
        box: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                with self._http.stream("POST", url, json=body) as response:
                    chunks = []
                    for chunk in response.iter_bytes():
                        chunks.append(chunk)
                        if time.monotonic() > deadline:
                            raise _Late
                    headers = response.headers.copy()  # of the decoded body now
                    for name in ("content-encoding", "content-length", "transfer-encoding"):
                        headers.pop(name, None)
                    box["response"] = httpx.Response(
                        response.status_code,
                        headers=headers,
                        content=b"".join(chunks),
                        request=response.request,
                        extensions={
                            k: v
                            for k, v in response.extensions.items()
                            if k in ("reason_phrase", "http_version")
                        },
                    )
            except BaseException as exc:  # handed to the caller's thread
                box["error"] = exc
            finally:
                with self._lock:
                    self._running = False
                    abandoned = self._closing
                done.set()
                if abandoned:
                    self._http.close()

        worker = threading.Thread(target=run, name="storydiff-llm-request", daemon=True)
        with self._lock:
            self._running = True
        worker.start()
        if not done.wait(max(0.0, deadline - time.monotonic())) and not done.is_set():
            raise _Late
        if "error" in box:
            raise box["error"]
        return box["response"]

    def _say(self, text: str) -> str:
        return redact(text, self.endpoint.api_key)

    def complete(
        self, messages: list[dict[str, str]], response_format: dict[str, Any] | None = None
    ) -> Reply:
        """POST one chat completion; the reply, or EndpointError/EndpointRejected in one
        sentence (the key redacted)."""
        httpx = self._httpx
        ep = self.endpoint
        body: dict[str, Any] = {"model": ep.model, "messages": messages, "stream": False}
        if response_format is not None:
            body["response_format"] = response_format
        log.debug("POST %s (model %s, %d messages)", ep.shown, ep.model, len(messages))
        started = time.monotonic()
        try:
            response = self._post(body)
        except (_Late, httpx.TimeoutException):
            waited = time.monotonic() - started
            raise EndpointError(
                self._say(
                    f"the LLM endpoint {ep.shown} did not answer within {ep.timeout:g} s "
                    f"(--llm-timeout; gave up after {waited:.1f} s without a whole answer); "
                    "raise --llm-timeout, or check that the server is not overloaded"
                )
            ) from None
        except httpx.ConnectError:
            raise EndpointError(
                self._say(
                    f"cannot reach the LLM endpoint {ep.shown}: is its server running, and is "
                    "--llm-base-url right?"
                )
            ) from None
        except (httpx.InvalidURL, httpx.UnsupportedProtocol):
            raise EndpointRejected(
                self._say(f"--llm-base-url {ep.shown} is not a URL httpx can use")
            ) from None
        except httpx.HTTPError as exc:
            raise EndpointError(
                self._say(
                    f"the connection to the LLM endpoint {ep.shown} failed "
                    f"({type(exc).__name__}); try again"
                )
            ) from None
        if response.status_code >= 400:
            raise self._http_error(response)
        return self._reply(response)

    def _http_error(self, response: Any) -> Exception:
        status = response.status_code
        detail = _error_detail(response)
        hint = ""
        if status in (401, 403):
            hint = f"; check the API key in ${self.endpoint.key_env} (--llm-key-env names another)"
        elif status == 404:
            hint = "; check --llm-base-url (it usually ends in /v1) and --llm-model"
        reason = f" {response.reason_phrase}" if response.reason_phrase else ""
        message = self._say(
            f"the LLM endpoint {self.endpoint.shown} answered HTTP {status}{reason}"
            + (f": {detail}" if detail else "")
            + hint
        )
        # 4xx other than timeouts and rate limits: the request as typed (key, model, URL).
        user_fixable = 400 <= status < 500 and status not in (408, 429)
        return EndpointRejected(message) if user_fixable else EndpointError(message)

    def _reply(self, response: Any) -> Reply:
        where = self.endpoint.shown
        try:
            data = response.json()
            choice = data["choices"][0]
            message = choice["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise EndpointError(
                self._say(
                    f"the answer from {where} is not a chat completion (no choices[0].message); "
                    "is --llm-base-url an OpenAI-compatible /v1 endpoint?"
                )
            ) from None
        if not isinstance(message, dict):
            raise EndpointError(self._say(f"the answer from {where} has no message object"))
        refusal = message.get("refusal")
        finish = choice.get("finish_reason") if isinstance(choice, dict) else None
        if refusal or finish == "content_filter":
            said = _squash(str(refusal)) if refusal else "its content filter stopped the answer"
            raise EndpointError(self._say(f"the model at {where} refused: {said}"))
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            # Some servers send a list of content parts; the text parts are the answer.
            content = (
                "".join(part.get("text", "") for part in content if isinstance(part, dict))
                if isinstance(content, list)
                else str(content)
            )
        # A server that echoes the key (in a prompt, a name) must not get it into the story,
        # stdout, a diff or a message: everything downstream reads only this text.
        return Reply(content=self._say(content) if content else content, finish_reason=finish)


def _squash(text: str, limit: int = _DETAIL_CHARS) -> str:
    """One line of at most `limit` characters (a server's message can be a page)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _error_detail(response: Any) -> str:
    """The server's own words about an HTTP error: OpenAI's `{"error": {"message"}}`, a bare
    `{"error": "..."}` (llama.cpp, Ollama), FastAPI's `{"detail"}` (vLLM), or the text."""
    try:
        data = response.json()
    except (ValueError, json.JSONDecodeError):
        return _squash(response.text or "")
    if isinstance(data, dict):
        error = data.get("error", data.get("detail", data.get("message")))
        if isinstance(error, dict):
            error = error.get("message", error)
        if error is not None:
            return _squash(error if isinstance(error, str) else json.dumps(error))
    return _squash(json.dumps(data))
