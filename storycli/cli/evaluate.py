"""`storydiff evaluate` (wired on the app in `storycli.cli`); torch and transformers are imported
inside the command, so `--help` stays instant."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from storycli.cli.common import (
    Device,
    JsonOpt,
    Quiet,
    Verbose,
    configure_logging,
    run_guarded,
    stderr_console,
)
from storycli.cli.progress import progress_bars
from storycli.evaluate import DEFAULT_CLIP, EVALUATION_FILE

ClipOpt = Annotated[
    str,
    typer.Option(
        "--clip",
        help="CLIP model: a hub id, a local folder, or tiny (random, offline, for tests). "
        f"Default: {DEFAULT_CLIP}, the model 1Prompt1Story's CLIP-T/CLIP-I are computed with.",
    ),
]


def evaluation_hooks(console: Console, progress: Any, quiet: bool) -> Any:
    """Progress and notes of one evaluation (shared with the benchmarks)."""
    from storycli.evaluate.run_scores import EvaluateHooks

    tasks: dict[str, Any] = {}

    def on_phase(what: str, done: int, total: int) -> None:
        if what not in tasks:
            tasks[what] = progress.add_task(what, total=total)
        progress.update(tasks[what], completed=done, total=total)

    def on_note(text: str) -> None:
        if not quiet:
            console.print(f"note: {escape(text)}", soft_wrap=True, highlight=False)

    return EvaluateHooks(on_note=on_note, on_phase=on_phase)


def print_evaluation(document: dict[str, Any], console: Console) -> None:
    """The run-level numbers, then one row per transition of a video."""
    from storycli.evaluate.run_scores import summary_rows

    table = Table(title=escape(document["run"]), title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for metric, value in summary_rows(document):
        table.add_row(escape(metric), escape(value))
    console.print(table)
    video = document.get("video")
    if video:
        rows = Table(show_lines=False)
        for column in ("transition", "CLIPSIM-first", "CLIPSIM-frames", "end fidelity", "motion"):
            rows.add_column(
                column,
                justify="left" if column == "transition" else "right",
                no_wrap=column == "transition",
            )
        for t in video["transitions"]:
            rows.add_row(
                escape(t["file"]),
                *(
                    "—" if t[k] is None else f"{t[k]:.4f}"
                    for k in ("clipsim_first", "clipsim_frames", "end_fidelity", "motion")
                ),
            )
        console.print(rows)


EVALUATE_EPILOG = (
    "[bold]Examples[/]\n\n"
    "  storydiff evaluate outputs/lighthouse\n\n"
    "  storydiff evaluate outputs/lighthouse --clip openai/clip-vit-large-patch14 --json\n\n"
    "  storydiff evaluate outputs/lighthouse/video      (the transitions only)\n\n"
    "  storydiff evaluate /tmp/out/two-friends --clip tiny   (offline smoke run)"
)


def evaluate(
    run_folder: Annotated[
        Path,
        typer.Argument(
            help="A `generate` output folder (its video/ folder from `animate` is scored too), "
            "or an `animate` output folder.",
            show_default=False,
        ),
    ],
    clip: ClipOpt = DEFAULT_CLIP,
    device: Device = "auto",
    json_out: JsonOpt = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Score a run: CLIP-T, CLIP-I (and DreamSim) for keyframes; CLIPSIM, end-frame fidelity,
    motion (and LPIPS) for its transition videos.

    Writes evaluation.json into the run folder and prints a table (--json: the document).
    DreamSim and LPIPS are computed when their packages are installed (pip install
    'storydiff\\[eval]'), else reported as "not installed".
    """
    configure_logging(verbose, quiet)
    from storycli.evaluate.run_scores import EvaluateOptions, evaluate_run

    console = stderr_console()
    show = not (quiet or json_out)

    def work() -> dict[str, Any]:
        with progress_bars(console, show) as progress:
            hooks = evaluation_hooks(console, progress, quiet)
            return evaluate_run(EvaluateOptions(run_folder, clip=clip, device=device), hooks)

    document = run_guarded(work, verbose)
    if json_out:
        typer.echo(json.dumps(document, indent=2, ensure_ascii=False))
        return
    if not quiet:
        print_evaluation(document, Console(highlight=False))
        console.print(
            f"[green]done[/] {escape(str(Path(document['run']) / EVALUATION_FILE))} written",
            highlight=False,
            soft_wrap=True,
        )
