"""The `storydiff` command line: the Typer app, and every command wired on it in one place.

Each command lives in the module of its group (stories, motion, evaluate, write, bench); what they
share lives in common.py and batch.py. Heavy imports (torch, diffusers) happen inside the commands,
so `storydiff --help` and `storydiff validate` stay instant.
"""

from __future__ import annotations

from typing import Annotated

import typer

from storycli import __version__
from storycli.cli.bench import bench_app
from storycli.cli.common import Command, Group
from storycli.cli.evaluate import EVALUATE_EPILOG, evaluate
from storycli.cli.motion import ANIMATE_EPILOG, TRAIN_PREDICTOR_EPILOG, animate, train_predictor
from storycli.cli.stories import (
    GENERATE_EPILOG,
    PAGES_EPILOG,
    VALIDATE_EPILOG,
    generate,
    pages,
    validate,
)
from storycli.cli.write import PLAN_EPILOG, plan

app = typer.Typer(
    cls=Group,
    name="storydiff",
    help="Turn a written story (YAML) into consistent keyframes of the same characters.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"storydiff {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, metavar="", help="Print the version."
        ),
    ] = False,
) -> None:
    """Turn a written story (YAML) into consistent keyframes of the same characters.

    [bold]Examples[/]

      storydiff validate stories/lighthouse.yaml
      storydiff generate stories/lighthouse.yaml --dry-run
      storydiff generate stories/two_friends.yaml --model tiny
    """


# Every command, in the order of `storydiff --help`: the workflow (check, generate, lay out),
# stage two, scoring, planning, then the benchmark group.
app.command("validate", cls=Command, epilog=VALIDATE_EPILOG)(validate)
app.command("generate", cls=Command, epilog=GENERATE_EPILOG)(generate)
app.command("pages", cls=Command, epilog=PAGES_EPILOG)(pages)
app.command("animate", cls=Command, epilog=ANIMATE_EPILOG)(animate)
app.command("train-predictor", cls=Command, epilog=TRAIN_PREDICTOR_EPILOG)(train_predictor)
app.command("evaluate", cls=Command, epilog=EVALUATE_EPILOG)(evaluate)
app.command("plan", cls=Command, epilog=PLAN_EPILOG)(plan)
app.add_typer(bench_app, name="bench")


def main() -> None:
    app()


__all__ = ["app", "main"]
