"""What `generate` and `animate` share to run several inputs: the batch options, one line (or
JSON line) per finished item, the summary table and the batch's exit code."""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from storycli.batch.runner import DONE, BatchItem, batch_exit_code
from storycli.batch.shard import Shard
from storycli.batch.shard import shard_from_env as _shard_from_env
from storycli.cli.common import Flag
from storycli.errors import InvalidInput

PANEL = "Batch and sharding"

ShardOpt = Annotated[
    str | None,
    typer.Option(
        "--shard",
        metavar="INDEX/COUNT",
        help="Render only this process's share, e.g. 0/4 … 3/4 (default: from RANK/WORLD_SIZE "
        "under torchrun or accelerate, SLURM_ARRAY_TASK_ID/COUNT in a SLURM array).",
        show_default=False,
        rich_help_panel=PANEL,
    ),
]
FailFast = Annotated[
    bool, Flag("--fail-fast", help="Stop at the first input that fails.", rich_help_panel=PANEL)
]
LogDir = Annotated[
    Path | None,
    typer.Option(
        "--log-dir",
        help="Append each input's log (outcome, errors with traceback) to DIR/<name>.log.",
        show_default=False,
        rich_help_panel=PANEL,
    ),
]
JsonLinesOpt = Annotated[
    bool,
    Flag("--json", help="Print one JSON line per input on stdout, nothing else (for scripts)."),
]


def display_shard(shard: Shard) -> Shard:
    """Whose progress this process shows: its shard, or the launcher's rank when a script
    passed `--shard 0/1` to a process it already gave its own inputs (only rank 0 draws bars)."""
    if shard.active:
        return shard
    try:
        return _shard_from_env()
    except InvalidInput:
        return shard


def shard_device_for(device: str, shard: Shard) -> str:
    """Each shard on a machine takes its own GPU (LOCAL_RANK) unless a device was named."""
    if not shard.active or device not in ("auto", "cuda"):
        return device
    import torch

    from storycli.batch.shard import shard_device

    return shard_device(device, shard, torch.cuda.device_count())


def announce_share(
    console: Console, shard: Shard, total: int, mine: int, split: Shard | None, quiet: bool
) -> None:
    if quiet or not shard.active:
        return
    if split is not None and split.active:
        what = f"one input, its frames shared over {shard.count} processes"
    else:
        what = f"{mine} of {total} input(s)"
    console.print(f"{escape(f'[{shard.label}]')} {what} ({escape(shard.source)})", highlight=False)


def report_item(item: BatchItem, json_out: bool, verbose: int) -> None:
    """An input's outcome as soon as it is known: its errors on stderr, its JSON line."""
    if item.status != DONE:
        if verbose and item.exception is not None:
            traceback.print_exception(item.exception)
        console = Console(stderr=True, highlight=False)
        for line in item.errors:
            console.print(f"[bold red]error:[/] {escape(line)}", soft_wrap=True)
    if json_out:
        typer.echo(json.dumps(item.to_json(), ensure_ascii=False))


def finish_batch(
    console: Console,
    items: Sequence[BatchItem],
    quiet: bool,
    describe: Callable[[dict[str, Any]], str],
) -> None:
    """The summary table of a batch of several inputs, then the batch's exit code."""
    if len(items) > 1 and not quiet:
        table = Table(title="summary", title_justify="left")
        table.add_column("input", no_wrap=True)  # a path is easiest found whole
        for column in ("status", "result", "seconds"):
            table.add_column(column, overflow="fold")
        for item in items:
            colour = {"done": "green", "not run": "dim"}.get(item.status, "red")
            result = describe(item.record) if item.status == DONE else "; ".join(item.errors)
            table.add_row(
                escape(str(item.item)),
                f"[{colour}]{item.status}[/]",
                escape(result),
                f"{item.seconds:.1f}",
            )
        console.print(table)
        done = sum(i.status == DONE for i in items)
        console.print(f"{done} of {len(items)} done", highlight=False)
    code = batch_exit_code(items)
    if code:
        raise typer.Exit(code)
