"""`storydiff validate`, `generate` and `pages`: the commands on story files and their runs.
Thin: parse options, call one function per command, print.

torch and diffusers are imported only inside `generate`, so `--help` and `validate` are instant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from storycli.batch.shard import resolve_shard
from storycli.cli.batch import (
    FailFast,
    JsonLinesOpt,
    LogDir,
    ShardOpt,
    announce_share,
    display_shard,
    finish_batch,
    report_item,
    shard_device_for,
)
from storycli.cli.common import (
    Device,
    Dtype,
    Flag,
    JsonOpt,
    Offload,
    Quiet,
    Verbose,
    at_least_one,
    choice,
    configure_logging,
    fail,
    run_guarded,
    stderr_console,
    story_error,
)
from storycli.config import ConfigFileError, Configs
from storycli.errors import EXIT_INVALID
from storycli.render.layouts import LAYOUTS
from storycli.story.loader import StoryError

StoryArg = Annotated[
    Path,
    typer.Argument(help="The story file (YAML), e.g. stories/lighthouse.yaml.", show_default=False),
]


def _warn(console: Console, path: Path, warnings: Any) -> None:
    """A plan's warnings, one line each, located like errors (`file field: message`)."""
    for warning in warnings:
        field = f" {warning.field}" if warning.loc else ""
        console.print(
            f"[yellow]warning:[/] {escape(str(path))}{escape(field)}: {escape(warning.message)}",
            soft_wrap=True,
            highlight=False,
        )


VALIDATE_EPILOG = (
    "[bold]Examples[/]\n\n  storydiff validate stories/lighthouse.yaml\n\n"
    "  storydiff validate stories/ --json"
)


def validate(
    stories: Annotated[
        list[str],
        typer.Argument(help="Story files, folders of them and globs.", show_default=False),
    ],
    json_out: JsonOpt = False,
) -> None:
    """Check story files without loading any model. Exit code 2 if any is invalid; warnings
    (e.g. a prompt over the text encoder's 77 tokens) do not change the exit code."""
    from storycli.batch.inputs import expand_stories
    from storycli.keyframes.plan import build_plan
    from storycli.story.loader import load_story

    configs = Configs()
    console = stderr_console()
    results, failed = [], False
    for path in run_guarded(lambda: expand_stories(stories), 0):
        try:
            plan = build_plan(load_story(path, configs), configs, path.parent)
        except StoryError as exc:
            failed = True
            results.append({"file": str(path), "valid": False, "errors": exc.lines()})
            if not json_out:
                story_error(exc)
            continue
        except ConfigFileError as exc:
            raise fail(str(exc), EXIT_INVALID) from None
        warnings = plan.warnings
        results.append(
            {
                "file": str(path),
                "valid": True,
                "frames": len(plan.frames),
                "warnings": [w.message for w in warnings],
            }
        )
        if not json_out:
            refs = "; ".join(
                f"{name}: frames {', '.join(str(i + 1) for i in idx)}"
                for name, idx in plan.references.items()
            )
            _warn(console, path, warnings)
            console.print(
                f"[green]ok[/] {escape(str(path))}: {len(plan.frames)} frames"
                + (f", references {escape(refs)}" if refs else ""),
                highlight=False,
                soft_wrap=True,
            )
    if json_out:
        typer.echo(json.dumps({"schema_version": 1, "stories": results}, indent=2))
    if failed:
        raise typer.Exit(EXIT_INVALID)


def _print_plan(plan: Any, console: Console) -> None:
    story = plan.story
    methods = " + ".join(story.consistency.methods) or "none"
    console.print(
        f"[bold]{escape(story.name)}[/]: {len(plan.frames)} frames, {story.width}×{story.height}, "
        f"{story.steps} steps, guidance {story.guidance}, {story.scheduler}, "
        f"model {escape(story.model)}, "
        f"seed {story.seed} (noise {story.noise}), consistency {methods}",
        highlight=False,
    )
    order = " → ".join(f"{c.phase}({', '.join(str(i + 1) for i in c.frames)})" for c in plan.calls)
    console.print(f"order: {order}", highlight=False)
    table = Table(show_lines=False)
    for column in ("#", "role", "characters", "seed", "prompt", "caption"):
        table.add_column(column, overflow="fold")
    for f in plan.frames:
        role = f"reference of {f.reference_of}" if f.reference_of else f.role
        table.add_row(
            str(f.number),
            escape(role),
            escape(", ".join(f.characters)) or "—",
            str(f.seed),
            escape(f.prompt),
            escape(f.caption or ""),
        )
    console.print(table)


GENERATE_EPILOG = (
    "[bold]Examples[/]\n\n"
    "  storydiff generate stories/lighthouse.yaml\n\n"
    "  storydiff generate stories/two_friends.yaml --model tiny --out /tmp/out\n\n"
    "  storydiff generate stories/lighthouse.yaml --dry-run\n\n"
    "  storydiff generate stories/lighthouse.yaml --seed 7 --overwrite --json\n\n"
    "  storydiff generate stories/ --log-dir logs        (every story of a folder)\n\n"
    "  storydiff generate 'episodes/*.yaml' --shard 0/2  (this process: half of them)\n\n"
    "  torchrun --nproc_per_node 4 --no-python storydiff generate stories/\n\n"
    "  storydiff generate stories/lighthouse.yaml --compile\n\n"
    "  storydiff generate story.yaml --model ./models/my-sdxl.safetensors --dtype float16"
)


def generate(
    stories: Annotated[
        list[str],
        typer.Argument(
            help="Story files (YAML), folders of them and globs; run in sorted order.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output root; frames go to OUT/<story name>/.")
    ] = Path("outputs"),
    model: Annotated[
        str | None,
        typer.Option(
            help="Override the story's model: a preset (sdxl, tiny, ...), a hub id, a local "
            "diffusers folder or a .safetensors file."
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(min=0, max=2**32 - 1, help="Override the story's seed.")
    ] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    offload: Offload = "none",
    vae_slicing: Annotated[
        bool,
        Flag(
            "--vae-slicing",
            help="Decode frames one at a time also with --decode-batch above 1.",
            rich_help_panel="Hardware",
        ),
    ] = False,
    vae_tiling: Annotated[
        bool, Flag("--vae-tiling", help="Decode large frames in tiles.", rich_help_panel="Hardware")
    ] = False,
    frame_batch: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Frames per UNet forward for frames that are not references (default: 4 on a "
            "GPU, 2 on a CPU). More is faster on a GPU and needs more memory; pixels do not "
            "change beyond float rounding.",
            rich_help_panel="Hardware",
        ),
    ] = None,
    decode_batch: Annotated[
        int,
        typer.Option(
            callback=at_least_one("--decode-batch"),
            help="Frames the VAE decodes at once. Each one more adds the VAE's activations at "
            "full size to the memory peak (GiBs per frame at 1024 px, in float32 unless the VAE "
            "is fp16-safe) for a little speed; pixels do not change beyond float rounding.",
            rich_help_panel="Hardware",
        ),
    ] = 1,
    checkpoint_every: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Save the denoising state every N steps, so a killed run resumes exactly "
            "where it was (default: every 3 minutes of work).",
        ),
    ] = None,
    compile_unet: Annotated[
        bool,
        Flag(
            "--compile",
            help="torch.compile the UNet (FLUX.1: the transformer): the first step compiles "
            "(minutes), later steps run faster. Worth it for long stories on a GPU.",
            rich_help_panel="Hardware",
        ),
    ] = False,
    save_characters: Annotated[
        Path | None,
        typer.Option(
            "--save-characters",
            help="Write each character's reference bank to DIR/<name>/ as it is made, for "
            "other stories to reuse (`characters: {Name: {bank: DIR/Name}}`).",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        Flag(
            "--overwrite",
            help="Regenerate every frame and allow replacing a folder made from another story.",
        ),
    ] = False,
    dry_run: Annotated[
        bool, Flag("--dry-run", help="Print the plan without loading any model.")
    ] = False,
    shard: ShardOpt = None,
    fail_fast: FailFast = False,
    log_dir: LogDir = None,
    json_out: JsonLinesOpt = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Generate stories' keyframes: one PNG per frame, grid.png and manifest.json per story.

    Frames whose inputs are unchanged since the last run are skipped, so an interrupted or
    edited story resumes where it stopped. Several stories load the model once; one story
    failing does not stop the others (exit code 3: some failed). Under torchrun, `accelerate
    launch` or a SLURM array each process renders its share (one story: its share of the frames).
    """
    from storycli.batch.inputs import expand_stories
    from storycli.batch.runner import run_batch
    from storycli.batch.shard import assign
    from storycli.keyframes.generate import GenerateOptions, load_plan

    paths = run_guarded(lambda: expand_stories(stories), verbose)
    this_shard = run_guarded(lambda: resolve_shard(shard), verbose)
    items, split = assign(paths, this_shard)
    options = GenerateOptions(
        out=out,
        model=str(Path(model).resolve()) if model and model.startswith((".", "~")) else model,
        seed=seed,
        device=shard_device_for(device, this_shard),
        dtype=dtype,
        offload=offload,
        vae_slicing=vae_slicing,
        vae_tiling=vae_tiling,
        overwrite=overwrite,
        compile=compile_unet,
        frame_batch=frame_batch,
        decode_batch=decode_batch,
        checkpoint_every=checkpoint_every,
        split=split,
        save_characters=save_characters,
    )
    configs = Configs()
    console = stderr_console()
    if not dry_run:
        configure_logging(verbose, quiet)
    announce_share(console, this_shard, len(paths), len(items), split, quiet)
    shown = display_shard(this_shard)
    show = not (quiet or json_out) and shown.leader
    lines = None if shown.leader or quiet else f"[{shown.label}]"
    from storycli.keyframes.model_cache import ModelCache

    models = ModelCache()

    def work(path: Path) -> dict[str, Any]:
        plan = load_plan(path, options, configs)
        if dry_run:
            if json_out:
                return plan.to_dict()
            _warn(console, path, plan.warnings)
            _print_plan(plan, Console(highlight=False))
            return {}
        from storycli.cli.progress import StoryProgress
        from storycli.keyframes.generate import generate_story

        if not quiet:
            _warn(console, path, plan.warnings)
        with StoryProgress(console, enabled=show, warnings=not quiet, lines=lines) as progress:
            result = generate_story(path, options, configs, progress.hooks(), plan, models)
        if not (quiet or json_out):
            print_done(console, result, lines)
        return result.summary()

    results = run_guarded(
        lambda: run_batch(
            items,
            work,
            on_done=lambda item: report_item(item, json_out, verbose),
            fail_fast=fail_fast,
            log_dir=log_dir,
        ),
        verbose,
    )
    finish_batch(console, results, quiet or json_out, describe_generated)


def describe_generated(record: dict[str, Any]) -> str:
    """A generate record in the summary table."""
    if "folder" not in record:
        return "plan printed"
    made = sum(f["status"] == "generated" for f in record["frames"])
    kept = sum(f["status"] == "skipped" for f in record["frames"])
    return f"{made} frame(s) generated, {kept} unchanged"


PAGES_EPILOG = (
    "[bold]Examples[/]\n\n  storydiff pages outputs/lighthouse --layout classic\n\n"
    "  storydiff pages outputs/lighthouse --layout four-panel --caption-font-size 28"
)


def pages(
    run_folder: Annotated[
        Path, typer.Argument(help="A `generate` output folder.", show_default=False)
    ],
    layout: Annotated[
        str | None,
        typer.Option(
            callback=lambda v: v if v is None else choice("--layout", LAYOUTS)(v),
            help="grid, four-panel or classic (default: the story's `layout`).",
        ),
    ] = None,
    caption_font_size: Annotated[
        int | None,
        typer.Option(min=6, max=400, help="Caption size in pixels (default: the story's)."),
    ] = None,
    verbose: Verbose = 0,
) -> None:
    """Lay out an existing run's frames as comic pages again (page_01.png, … and comic.pdf),
    without generating anything."""
    from storycli.render.pages import relayout

    written = run_guarded(lambda: relayout(run_folder, layout, caption_font_size), verbose)
    stderr_console().print(
        f"[green]done[/] {escape(str(run_folder))}: {len(written)} page(s) and comic.pdf",
        highlight=False,
        soft_wrap=True,
    )


def print_done(console: Console, result: Any, lines: str | None) -> None:
    made, kept = len(result.generated), len(result.skipped)
    removed = f"{len(result.removed)} stale removed, " if result.removed else ""
    if result.others:
        removed += f"{len(result.others)} for other shards, "
    prefix = f"{escape(lines)} " if lines else ""
    if result.finished:
        tail = f"grid.png and manifest.json written in {result.seconds:.1f} s"
    else:
        tail = f"in {result.seconds:.1f} s; the last shard to finish writes grid.png"
    console.print(
        f"{prefix}[green]done[/] {escape(str(result.folder))}: {made} frame(s) generated, "
        f"{kept} unchanged, {removed}{tail}",
        highlight=False,
        soft_wrap=True,
    )
