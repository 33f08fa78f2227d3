"""The `storydiff` command line. Thin: parse options, call one function per command, print.

torch and diffusers are imported only inside `generate`, so `--help` and `validate` are instant.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .config import ConfigFileError, Configs
from .story import StoryError

app = typer.Typer(
    name="storydiff",
    help="Turn a written story (YAML) into consistent keyframes of the same characters.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

EXIT_RUNTIME = 1
EXIT_INVALID = 2


def _stderr() -> Console:
    return Console(stderr=True, highlight=False)


def _fail(message: str, code: int, verbose: bool = False) -> typer.Exit:
    if verbose and sys.exc_info()[0] is not None:
        traceback.print_exc()
    _stderr().print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def run_guarded(
    work: Callable[[], Any],
    verbose: int,
    invalid: tuple[type[BaseException], ...] = (),
    runtime: tuple[type[BaseException], ...] = (),
) -> Any:
    """Run a command's `work()`: the expected failures become one line and an exit code (2 for
    `invalid` input, 1 for `runtime` problems); anything else is reported as unexpected."""
    try:
        return work()
    except invalid as exc:
        raise _fail(str(exc), EXIT_INVALID, verbose > 0) from None
    except runtime as exc:
        raise _fail(str(exc), EXIT_RUNTIME, verbose > 0) from None
    except KeyboardInterrupt:
        _stderr().print("interrupted: finished files are kept; run the same command to resume")
        raise typer.Exit(130) from None
    except Exception as exc:  # a bug, or an environment problem we did not foresee
        raise _fail(
            f"{type(exc).__name__}: {exc} (run again with -v for the traceback)",
            EXIT_RUNTIME,
            verbose > 0,
        ) from None


def _story_error(exc: StoryError) -> typer.Exit:
    console = _stderr()
    for line in exc.lines():
        console.print(f"[bold red]error:[/] {escape(line)}", soft_wrap=True, highlight=False)
    return typer.Exit(EXIT_INVALID)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"storydiff {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Turn a written story (YAML) into consistent keyframes of the same characters.

    [bold]Examples[/]

      storydiff validate stories/lighthouse.yaml
      storydiff generate stories/lighthouse.yaml --dry-run
      storydiff generate stories/two_friends.yaml --model tiny
    """


StoryArg = Annotated[
    Path,
    typer.Argument(help="The story file (YAML), e.g. stories/lighthouse.yaml.", show_default=False),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print only a JSON document on stdout (for scripts).")
]


@app.command(
    epilog="[bold]Examples[/]\n\n  storydiff validate stories/lighthouse.yaml\n\n"
    "  storydiff validate stories/*.yaml --json"
)
def validate(
    stories: Annotated[
        list[Path], typer.Argument(help="One or more story files.", show_default=False)
    ],
    json_out: JsonOpt = False,
) -> None:
    """Check story files without loading any model. Exit code 2 if any is invalid."""
    from .plan import build_plan
    from .story import load_story

    configs = Configs()
    results, failed = [], False
    for path in stories:
        try:
            plan = build_plan(load_story(path, configs), configs)
        except StoryError as exc:
            failed = True
            results.append({"file": str(path), "valid": False, "errors": exc.lines()})
            if not json_out:
                _story_error(exc)
            continue
        except ConfigFileError as exc:
            raise _fail(str(exc), EXIT_INVALID) from None
        results.append({"file": str(path), "valid": True, "frames": len(plan.frames)})
        if not json_out:
            refs = "; ".join(
                f"{name}: frames {', '.join(str(i + 1) for i in idx)}"
                for name, idx in plan.references.items()
            )
            _stderr().print(
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
    console.print(
        f"[bold]{escape(story.name)}[/]: {len(plan.frames)} frames, {story.width}×{story.height}, "
        f"{story.steps} steps, guidance {story.guidance}, {story.scheduler}, "
        f"model {escape(story.model)}, "
        f"seed {story.seed} (noise {story.noise}), consistency {story.consistency.method}",
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


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.DEBUG if verbose else (logging.ERROR if quiet else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        # diffusers/transformers chatter (torchvision fallback notes, progress bars).
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # diffusers passes huggingface_hub a deprecated argument when it looks for weights: a
        # multi-line warning before our one-line error about missing weights.
        warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument")


@app.command(
    epilog="[bold]Examples[/]\n\n"
    "  storydiff generate stories/lighthouse.yaml\n\n"
    "  storydiff generate stories/two_friends.yaml --model tiny --out /tmp/out\n\n"
    "  storydiff generate stories/lighthouse.yaml --dry-run\n\n"
    "  storydiff generate stories/lighthouse.yaml --seed 7 --overwrite --json\n\n"
    "  storydiff generate stories/lighthouse.yaml --compile\n\n"
    "  storydiff generate story.yaml --model ./models/my-sdxl.safetensors --dtype float16"
)
def generate(
    story: StoryArg,
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
    device: Annotated[
        str, typer.Option(help="auto, cpu, cuda, cuda:1, mps.", rich_help_panel="Hardware")
    ] = "auto",
    dtype: Annotated[
        str,
        typer.Option(
            help="auto (float16 on GPU, float32 on CPU), float32, float16, bfloat16.",
            rich_help_panel="Hardware",
        ),
    ] = "auto",
    offload: Annotated[
        str,
        typer.Option(
            help="Keep weights on the CPU between uses: none, model (moderate savings), "
            "sequential (lowest memory, slow).",
            rich_help_panel="Hardware",
        ),
    ] = "none",
    vae_slicing: Annotated[
        bool, typer.Option(help="Decode frames one at a time.", rich_help_panel="Hardware")
    ] = False,
    vae_tiling: Annotated[
        bool, typer.Option(help="Decode large frames in tiles.", rich_help_panel="Hardware")
    ] = False,
    compile_unet: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="torch.compile the UNet: the first steps of each new batch shape compile "
            "(minutes), later steps run faster. Worth it for long stories on a GPU.",
            rich_help_panel="Hardware",
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            help="Regenerate every frame and allow replacing a folder made from another story."
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan without loading any model.")
    ] = False,
    json_out: JsonOpt = False,
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More detail; tracebacks on errors.")
    ] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notes.")] = False,
) -> None:
    """Generate a story's keyframes: one PNG per frame, grid.png and manifest.json.

    Frames whose inputs are unchanged since the last run are skipped, so an interrupted or
    edited story resumes where it stopped.
    """
    from .generate import GenerateOptions, load_plan

    if offload not in ("none", "model", "sequential"):
        raise _fail(f"--offload {offload}: choose none, model or sequential", EXIT_INVALID)
    options = GenerateOptions(
        out=out,
        model=str(Path(model).resolve()) if model and model.startswith((".", "~")) else model,
        seed=seed,
        device=device,
        dtype=dtype,
        offload=offload,
        vae_slicing=vae_slicing,
        vae_tiling=vae_tiling,
        overwrite=overwrite,
        compile=compile_unet,
    )
    configs = Configs()
    try:
        plan = load_plan(story, options, configs)
    except StoryError as exc:
        raise _story_error(exc) from None
    except ConfigFileError as exc:
        raise _fail(str(exc), EXIT_INVALID) from None
    if dry_run:
        if json_out:
            typer.echo(json.dumps(plan.to_dict(), indent=2, ensure_ascii=False))
        else:
            _print_plan(plan, Console(highlight=False))
        return

    _configure_logging(verbose, quiet)
    from .progress import StoryProgress

    show = not (quiet or json_out)
    from .generate import generate_story
    from .models import ModelUnavailable
    from .runs import OutputConflict

    def work() -> Any:
        with StoryProgress(_stderr(), enabled=show) as progress:
            return generate_story(story, options, configs, progress.hooks(), plan=plan)

    result = run_guarded(work, verbose, runtime=(ModelUnavailable, OutputConflict))

    if json_out:
        typer.echo(json.dumps(result.summary(), indent=2, ensure_ascii=False))
    elif not quiet:
        made, kept = len(result.generated), len(result.skipped)
        _stderr().print(
            f"[green]done[/] {escape(str(result.folder))}: {made} frame(s) generated, "
            f"{kept} unchanged, "
            f"grid.png and manifest.json written in {result.seconds:.1f} s",
            highlight=False,
            soft_wrap=True,
        )


def main() -> None:
    app()


# Stage-two commands live in their own module; importing it registers them on `app`.
from . import cli_motion  # noqa: E402, F401
