"""What every `storydiff` command shares: the command classes, options, logging and the one rule
that turns failures into a sentence and an exit code.

Imported by the command modules of this package; it imports none of them, and the `app` lives in
`storycli.cli` (`__init__.py`), which wires every command on it.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from storycli.batch.runner import describe_failure
from storycli.errors import EXIT_INTERRUPTED, EXIT_INVALID
from storycli.story.loader import StoryError


class _PlainHelp:
    """Typer's own -h/--help option reads `<bool>` in --help; show it as the flag it is."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class Command(_PlainHelp, TyperCommand):
    """The class of every storydiff command (`@app.command(cls=Command)`)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        _refuse_empty_out(self, args)
        return super().parse_args(ctx, args)


def _refuse_empty_out(command: Any, args: list[str]) -> None:
    """`--out ""` would become Path(""), the current folder: refuse it before it is parsed."""
    names = {o for p in command.params if "--out" in getattr(p, "opts", ()) for o in p.opts}
    for k, arg in enumerate(args):
        if arg == "--":
            return
        empty = arg.startswith("--out=") and not arg.partition("=")[2].strip()
        if empty or (arg in names and k + 1 < len(args) and not args[k + 1].strip()):
            raise fail(
                '--out "": an empty path would write into the current folder; name the '
                "output folder (--out . for the current one)",
                EXIT_INVALID,
            )


class Group(_PlainHelp, TyperGroup):
    """The class of the `storydiff` app and its command groups (`typer.Typer(cls=Group)`)."""


DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DTYPES = ("auto", "float32", "float16", "bfloat16")
OFFLOADS = ("none", "model", "sequential")


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


def fail(message: str, code: int, verbose: bool = False) -> typer.Exit:
    """Print `error: message` on stderr (the traceback first with -v); the Exit to raise."""
    if verbose and sys.exc_info()[0] is not None:
        traceback.print_exc()
    stderr_console().print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def story_error(exc: StoryError) -> typer.Exit:
    return print_failure(exc, verbose=False)


def print_failure(exc: BaseException, verbose: bool) -> typer.Exit:
    """Print a failure as `error:` lines on stderr (the traceback first with -v); the Exit to
    raise, with the failure's exit code."""
    code, lines = describe_failure(exc)
    if verbose:
        traceback.print_exception(exc)
    console = stderr_console()
    for line in lines:
        console.print(f"[bold red]error:[/] {escape(line)}", soft_wrap=True, highlight=False)
    return typer.Exit(code)


def interrupted() -> typer.Exit:
    stderr_console().print("interrupted: finished files are kept; run the same command to resume")
    return typer.Exit(EXIT_INTERRUPTED)


def run_guarded(work: Callable[[], Any], verbose: int) -> Any:
    """Run a command's `work()`. Expected failures become one line and an exit code (see
    `batch.runner.describe_failure`: 2 for bad input, 1 for runtime problems and anything
    unforeseen)."""
    try:
        return work()
    except KeyboardInterrupt:
        raise interrupted() from None
    except Exception as exc:
        raise print_failure(exc, verbose > 0) from None


def configure_logging(verbose: int, quiet: bool) -> None:
    """-v: storydiff's own debug lines (libraries stay at warnings); -vv: every library's too."""
    level = logging.DEBUG if verbose > 1 else (logging.ERROR if quiet else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose:
        logging.getLogger("storycli").setLevel(logging.DEBUG)
        return
    # diffusers/transformers chatter (torchvision fallback notes, progress bars).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # diffusers passes huggingface_hub a deprecated argument when it looks for weights: a
    # multi-line warning before our one-line error about missing weights.
    warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument")


# -- option checks (torch-free: run before anything heavy is imported) -------------------------


def _check_device(value: str) -> str:
    if not DEVICE_RE.match(value):
        raise fail(
            f"--device {value}: choose auto, cpu, cuda, cuda:N (e.g. cuda:1) or mps", EXIT_INVALID
        )
    return value


def choice(option: str, choices: tuple[str, ...]) -> Callable[[str], str]:
    """An option callback: one `error:` line and exit 2 unless the value is one of `choices`
    (the commands' own style, rather than click's usage box)."""

    def check(value: str) -> str:
        if value not in choices:
            raise fail(f"{option} {value}: choose {', '.join(choices)}", EXIT_INVALID)
        return value

    return check


def at_least_one(option: str) -> Callable[[int | None], int | None]:
    """An option callback: one `error:` line and exit 2 for a count below 1."""

    def check(value: int | None) -> int | None:
        if value is not None and value < 1:
            raise fail(f"{option} {value}: must be 1 or more", EXIT_INVALID)
        return value

    return check


# -- options shared by several commands ---------------------------------------------------------


def Flag(*names: str, help: str, **kwargs: Any) -> Any:
    """A plain on/off flag: shown as `--name` in --help, without a type or a `--no-` twin."""
    return typer.Option(*names, help=help, metavar="", show_default=False, **kwargs)


JsonOpt = Annotated[
    bool, Flag("--json", help="Print only a JSON document on stdout (for scripts).")
]
Verbose = Annotated[
    int,
    typer.Option(
        "--verbose",
        "-v",
        count=True,
        metavar="",
        show_default=False,
        help="More detail and tracebacks on errors; -vv adds the libraries' debug output.",
    ),
]
Quiet = Annotated[bool, Flag("--quiet", "-q", help="No progress or notes.")]
Device = Annotated[
    str,
    typer.Option(
        help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps.",
        callback=_check_device,
        rich_help_panel="Hardware",
    ),
]
Dtype = Annotated[
    str,
    typer.Option(
        help="auto (float16 on GPU, float32 on CPU), float32, float16, bfloat16.",
        callback=choice("--dtype", DTYPES),
        rich_help_panel="Hardware",
    ),
]
Offload = Annotated[
    str,
    typer.Option(
        help="Keep weights on the CPU between uses: none, model (moderate savings), "
        "sequential (lowest memory, slow; CUDA only).",
        callback=choice("--offload", OFFLOADS),
        rich_help_panel="Hardware",
    ),
]
