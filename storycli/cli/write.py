"""`storydiff plan`: write a story file with a language model (from an emotion, a synopsis, a
cast), or, with `--resolve`, name every character reference in an existing one. Wired on the
app in `storycli.cli`; the work lives in `storycli.llm`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from storycli.cli.common import (
    Flag,
    JsonOpt,
    Quiet,
    Verbose,
    configure_logging,
    fail,
    run_guarded,
    stderr_console,
)
from storycli.errors import EXIT_INVALID, InvalidInput, RuntimeProblem
from storycli.llm.client import DEFAULT_BASE_URL, DEFAULT_KEY_ENV, DEFAULT_TIMEOUT
from storycli.story.loader import StoryError

if TYPE_CHECKING:
    from storycli.config import Configs
    from storycli.llm.client import Endpoint
    from storycli.llm.schema import PlanRequest

_LLM = "LLM endpoint (any OpenAI-compatible server)"
_RESOLVE = "Resolve references in an existing story"

PLAN_EPILOG = (
    "[bold]Examples[/]\n\n"
    "  storydiff plan --emotion joyful --frames 6 --out joy.yaml --llm-model qwen2.5\n\n"
    "  storydiff plan --synopsis 'a keeper and her cat weather a storm' --characters "
    "'Mara: a young woman with short red hair, yellow raincoat' --characters "
    "'Ollie: a small grey cat with a white chest' --style comic --out storm.yaml\n\n"
    "  storydiff plan --emotion melancholy --llm-base-url http://127.0.0.1:11434/v1 "
    "--llm-model llama3.1   (Ollama)\n\n"
    "  OPENAI_API_KEY=sk-... storydiff plan --emotion hopeful --llm-base-url "
    "https://api.openai.com/v1 --llm-model gpt-4o-mini --json\n\n"
    "  storydiff plan --resolve stories/draft.yaml --llm-model qwen2.5          (show the diff)\n\n"
    "  storydiff plan --resolve stories/draft.yaml --llm-model qwen2.5 --write  (save it, "
    "keeping draft.yaml.bak)\n\n"
    "The endpoint's base URL and model can also come from STORYDIFF_LLM_BASE_URL and "
    "STORYDIFF_LLM_MODEL. llama.cpp: http://127.0.0.1:8080/v1 (the default), Ollama: "
    "http://127.0.0.1:11434/v1, vLLM: http://127.0.0.1:8000/v1."
)


def _parse_cast(values: list[str], frames: int) -> dict[str, str]:
    """`--characters "Name: appearance"` options → name → appearance, checked before any
    request (the story format's name rule; each character needs a frame of its own)."""
    from storycli.llm.schema import NAME_RE

    cast: dict[str, str] = {}
    for value in values:
        name, sep, look = value.partition(":")
        name, look = name.strip(), " ".join(look.split())
        if not sep or not name or not look:
            raise fail(
                f"--characters {value!r}: write it as 'Name: appearance', e.g. "
                "'Mara: a young woman with short red hair, yellow raincoat'",
                EXIT_INVALID,
            )
        if name == "NC" or not NAME_RE.fullmatch(name):
            raise fail(
                f"--characters: {name!r} cannot be a character name (letters, digits, spaces, "
                "_ ' . -; not NC)",
                EXIT_INVALID,
            )
        if name.casefold() in (n.casefold() for n in cast):
            raise fail(f"--characters: {name} is given twice", EXIT_INVALID)
        cast[name] = look
    if len(cast) > frames:
        raise fail(
            f"--frames {frames} is too few for {len(cast)} characters: each needs a frame of "
            "its own (its reference picture)",
            EXIT_INVALID,
        )
    return cast


def _check_out(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise fail(
            f"--out {out} is a folder; name the story file, e.g. {out}/story.yaml", EXIT_INVALID
        )
    if out.exists() and not overwrite:
        raise fail(f"--out {out} exists; choose another name, or add --overwrite", EXIT_INVALID)
    if not out.parent.is_dir():
        raise fail(f"--out {out}: the folder {out.parent} does not exist", EXIT_INVALID)
    _check_writable(out, "--out", "choose another --out")


def _check_writable(path: Path, option: str, fix: str) -> None:
    """Before any request: a read-only place would otherwise fail only after the model
    answered (files are written atomically, through a temporary file beside `path`)."""
    from storycli.paths import write_problem

    if problem := write_problem(path.parent):
        reason = problem.split(": ", 1)[-1]
        raise fail(
            f"{option} {path}: cannot write in {path.parent} ({reason}); {fix}", EXIT_INVALID
        )


def _guard(work: Any, key: str | None) -> Any:
    """Run `work`; an unforeseen exception whose text holds the key is re-raised without it
    (and without its chain, which -v would print)."""
    try:
        return work()
    except (InvalidInput, RuntimeProblem, StoryError):
        raise
    except Exception as exc:
        if key and key in str(exc):
            raise RuntimeProblem(f"{type(exc).__name__}: {str(exc).replace(key, '***')}") from None
        raise


def plan(
    emotion: Annotated[
        str | None,
        typer.Option(help="The feeling the story should carry, e.g. joyful, melancholy, tense."),
    ] = None,
    synopsis: Annotated[
        str | None, typer.Option(help="What happens, in a sentence or a paragraph.")
    ] = None,
    characters: Annotated[
        list[str] | None,
        typer.Option(
            "--characters",
            metavar="'NAME: LOOK'",
            help="A fixed character: name and appearance (face, hair, clothes). Repeat for "
            "each; without it the model invents the cast.",
            show_default=False,
        ),
    ] = None,
    frames: Annotated[int, typer.Option(min=1, max=40, help="Number of frames.")] = 6,
    style: Annotated[
        str | None, typer.Option(help="A style of configs/styles.yaml, e.g. comic, storybook.")
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            min=0, max=2**32 - 1, help="The story's seed (default: one derived from the plan)."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Write the story here (it is printed either way)."),
    ] = None,
    overwrite: Annotated[bool, Flag("--overwrite", help="Replace an existing --out file.")] = False,
    resolve: Annotated[
        Path | None,
        typer.Option(
            "--resolve",
            metavar="STORY",
            help="Instead of writing a story: rewrite STORY's prompts so every pronoun or vague "
            "reference to a character is its [Name] tag; prints a diff.",
            rich_help_panel=_RESOLVE,
        ),
    ] = None,
    write: Annotated[
        bool,
        Flag(
            "--write",
            help="With --resolve: save the change (atomically; the original goes to STORY.bak, "
            "or STORY.bak.N beside earlier backups).",
            rich_help_panel=_RESOLVE,
        ),
    ] = False,
    llm_base_url: Annotated[
        str,
        typer.Option(
            envvar="STORYDIFF_LLM_BASE_URL",
            help="The server's OpenAI-compatible base URL (ends in /v1).",
            rich_help_panel=_LLM,
        ),
    ] = DEFAULT_BASE_URL,
    llm_model: Annotated[
        str | None,
        typer.Option(
            envvar="STORYDIFF_LLM_MODEL",
            help="The model's name on the server (llama.cpp accepts any).",
            rich_help_panel=_LLM,
        ),
    ] = None,
    llm_key_env: Annotated[
        str,
        typer.Option(
            metavar="VAR",
            help="The environment variable holding the API key (unset: no key is sent).",
            rich_help_panel=_LLM,
        ),
    ] = DEFAULT_KEY_ENV,
    llm_timeout: Annotated[
        float,
        typer.Option(
            min=0.01,
            max=3600,
            metavar="SECONDS",
            help="How long to wait for each whole answer (a deadline, not a per-read limit).",
            rich_help_panel=_LLM,
        ),
    ] = DEFAULT_TIMEOUT,
    json_out: JsonOpt = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Write a story file with a language model, from an emotion, a synopsis and an optional
    fixed cast; or, with --resolve, make every reference to a character in a story name it.

    The story is printed on stdout (with --json: the model's parsed plan) and written to --out;
    it passes `storydiff validate`. The model is asked for JSON matching a schema, and an
    answer that does not fit is sent back with the problem, at most twice."""
    from storycli.config import Configs

    configure_logging(verbose, quiet)
    configs = Configs()
    # Every option is checked before any request: a mistake costs no model answer.
    cast: dict[str, str] = {}
    if resolve is not None:
        given = {"--emotion": emotion, "--synopsis": synopsis, "--characters": characters}
        given |= {"--style": style, "--seed": seed, "--out": out}
        _check_resolve_options(resolve, write, given)
    else:
        cast = _check_plan_options(
            emotion, synopsis, characters, frames, style, out, overwrite, write, configs
        )
    endpoint = _endpoint(llm_base_url, llm_model, llm_key_env, llm_timeout)
    if resolve is not None:
        _resolve(resolve, write, endpoint, configs, json_out, verbose)
        return
    from storycli.llm.schema import PlanRequest

    request = PlanRequest(
        emotion=(emotion or "").strip() or None,
        synopsis=(synopsis or "").strip() or None,
        cast=cast,
        frames=frames,
        style=style,
        seed=seed,
    )
    _write_plan(request, endpoint, configs, out, json_out, verbose, quiet)


def _check_resolve_options(resolve: Path, write: bool, given: dict[str, Any]) -> None:
    """--resolve edits an existing story: no option of a new story goes with it."""
    named = [option for option, value in given.items() if value is not None and value != []]
    if named:
        raise fail(
            f"{named[0]} does not go with --resolve, which edits an existing story's prompts",
            EXIT_INVALID,
        )
    if write and resolve.parent.is_dir():
        _check_writable(resolve, "--resolve", "copy the story somewhere writable")


def _check_plan_options(
    emotion: str | None,
    synopsis: str | None,
    characters: list[str] | None,
    frames: int,
    style: str | None,
    out: Path | None,
    overwrite: bool,
    write: bool,
    configs: Configs,
) -> dict[str, str]:
    """A new story's options, checked; its fixed cast (name → appearance)."""
    if write:
        raise fail("--write goes with --resolve STORY (it saves the resolved story)", EXIT_INVALID)
    if not (emotion or "").strip() and not (synopsis or "").strip():
        raise fail("give --emotion, --synopsis or both, e.g. --emotion joyful", EXIT_INVALID)
    if style is not None and style not in configs.styles:
        raise fail(f"--style {style}: choose one of {', '.join(configs.styles)}", EXIT_INVALID)
    if out is not None:
        _check_out(out, overwrite)
    return _parse_cast(characters or [], frames)


def _endpoint(base_url: str, model: str | None, key_env: str, timeout: float) -> Endpoint:
    """The language model's endpoint, from the --llm-* options (its key from `key_env`)."""
    from storycli.llm.client import Endpoint, check_base_url, key_from_env

    if not model:
        raise fail(
            "give --llm-model (or STORYDIFF_LLM_MODEL): the model's name on the server, e.g. "
            "llama3.1 for Ollama, gpt-4o-mini for OpenAI; llama.cpp accepts any name",
            EXIT_INVALID,
        )
    try:
        return Endpoint(
            base_url=check_base_url(base_url),
            model=model,
            api_key=key_from_env(key_env, required=key_env != DEFAULT_KEY_ENV),
            timeout=timeout,
            key_env=key_env,
        )
    except InvalidInput as exc:
        raise fail(str(exc), EXIT_INVALID) from None


def _write_plan(
    request: PlanRequest,
    endpoint: Endpoint,
    configs: Configs,
    out: Path | None,
    json_out: bool,
    verbose: int,
    quiet: bool,
) -> None:
    """Ask the model for the story, write it to `out` (if given) and print it."""
    from storycli.atomic import atomic_write_text
    from storycli.llm.client import ChatClient
    from storycli.llm.planner import plan_story

    def work() -> Any:
        with ChatClient(endpoint) as chat:
            planned = plan_story(chat, request, configs, out.name if out else "story.yaml")
        if out is not None:
            atomic_write_text(out, planned.text)
        return planned

    planned = run_guarded(lambda: _guard(work, endpoint.api_key), verbose)
    if json_out:
        record = {
            "schema_version": 1,
            "plan": planned.plan.model_dump(),
            "out": str(out) if out else None,
        }
        typer.echo(json.dumps(record, indent=2, ensure_ascii=False))
    else:
        typer.echo(planned.text, nl=False)
    if out is not None and not quiet:
        names = ", ".join(c.name for c in planned.plan.characters)
        stderr_console().print(
            f"[green]wrote[/] {escape(str(out))}: {len(planned.plan.frames)} frames, "
            f"characters {escape(names)}; next: storydiff generate {escape(str(out))}",
            highlight=False,
            soft_wrap=True,
        )


def _resolve(
    path: Path, write: bool, endpoint: Any, configs: Any, json_out: bool, verbose: int
) -> None:
    from storycli.llm.client import ChatClient
    from storycli.llm.resolve import backup_path, describe, resolve_story, write_resolved

    def work() -> Any:
        with ChatClient(endpoint) as chat:
            result = resolve_story(chat, path, configs)
        backup = write_resolved(result) if write and result.changes else None
        return result, backup

    result, backup = run_guarded(lambda: _guard(work, endpoint.api_key), verbose)
    console = stderr_console()
    if json_out:
        record = {
            "schema_version": 1,
            **describe(result),
            "diff": result.diff,
            "written": backup is not None,
            "backup": str(backup) if backup else None,
        }
        typer.echo(json.dumps(record, indent=2, ensure_ascii=False))
        return
    if not result.changes:
        why = result.note or "every reference already names its character"
        console.print(
            f"nothing to resolve in {escape(str(path))}: {escape(why)}",
            highlight=False,
            soft_wrap=True,
        )
        return
    typer.echo(result.diff, nl=False)
    count = len(result.changes)
    if backup is not None:
        console.print(
            f"[green]wrote[/] {escape(str(path))}: {count} prompt(s) changed; the original is "
            f"{escape(str(backup))}",
            highlight=False,
            soft_wrap=True,
        )
    else:
        console.print(
            f"{count} prompt(s) would change; nothing written: add --write to save them "
            f"(the original is kept as {escape(str(backup_path(path)))})",
            highlight=False,
            soft_wrap=True,
        )
