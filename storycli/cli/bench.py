"""`storydiff bench consistory-plus` and `storydiff bench vistorybench`, on `bench_app`, which
`storycli.cli` adds to the app as the `bench` group; heavy imports happen inside."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from storycli.cli.common import (
    Command,
    Device,
    Dtype,
    Flag,
    Group,
    JsonOpt,
    Offload,
    Quiet,
    Verbose,
    configure_logging,
    fail,
    run_guarded,
    stderr_console,
)
from storycli.cli.progress import progress_bars
from storycli.errors import EXIT_INVALID, EXIT_SOME_FAILED
from storycli.evaluate import DEFAULT_CLIP
from storycli.suites import BENCH_METHODS

bench_app = typer.Typer(
    cls=Group,
    help="Run public story benchmarks with storydiff: ConsiStory+ (scored here) and "
    "ViStoryBench (laid out for its own scorer).",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _methods(value: list[str] | None) -> list[str] | None:
    """`--methods a,b --methods c` → [a, b, c] (checked by the benchmark, before any work)."""
    if value is None:
        return None
    return [m.strip() for item in value for m in item.split(",") if m.strip()]


def _size(value: str | None) -> str | None:
    match = re.fullmatch(r"(\d+)x(\d+)", value) if value is not None else None
    if value is not None and (
        match is None or any(int(v) % 32 or not 64 <= int(v) <= 4096 for v in match.groups())
    ):
        raise fail(
            f"--size {value}: write WIDTHxHEIGHT, multiples of 32 from 64 to 4096 (e.g. 1024x1024)",
            EXIT_INVALID,
        )
    return value


Out = Annotated[
    Path, typer.Option("--out", "-o", help="Benchmark folder (stories, runs, results).")
]
Model = Annotated[
    str,
    typer.Option(
        help="SDXL weights: a preset (sdxl, tiny, ...), a hub id, a local folder or file."
    ),
]
Methods = Annotated[
    list[str] | None,
    typer.Option(
        "--methods",
        help="Consistency methods to run, comma-separated or repeated: "
        f"{', '.join(BENCH_METHODS)}.",
        callback=_methods,
        metavar="METHOD,...",
        show_default=False,
    ),
]
Limit = Annotated[int | None, typer.Option(min=1, help="Only the first N items.")]
Steps = Annotated[
    int | None, typer.Option(min=1, help="Denoising steps (default: the benchmark's, 50).")
]
Size = Annotated[
    str | None,
    typer.Option(help="WIDTHxHEIGHT, multiples of 32 (default: the benchmark's).", callback=_size),
]
Seed = Annotated[
    int | None, typer.Option(min=0, max=2**32 - 1, help="Seed (default: the benchmark's, 42).")
]
VaeSlicing = Annotated[
    bool, Flag("--vae-slicing", help="Decode frames one at a time.", rich_help_panel="Hardware")
]
VaeTiling = Annotated[
    bool, Flag("--vae-tiling", help="Decode large frames in tiles.", rich_help_panel="Hardware")
]
FrameBatch = Annotated[
    int | None,
    typer.Option(
        min=1, help="Frames per UNet forward (as for generate).", rich_help_panel="Hardware"
    ),
]
Overwrite = Annotated[bool, Flag("--overwrite", help="Regenerate every frame.")]


def _options(
    out: Path,
    model: str,
    methods: list[str] | None,
    default_methods: tuple[str, ...],
    limit: int | None,
    steps: int | None,
    size: str | None,
    seed: int | None,
    device: str,
    dtype: str,
    offload: str,
    vae_slicing: bool,
    vae_tiling: bool,
    frame_batch: int | None,
    overwrite: bool,
) -> Any:
    from storycli.suites.common import BenchOptions

    width_height = tuple(int(v) for v in size.split("x")) if size else None
    return BenchOptions(
        out=out,
        model=model,
        methods=tuple(methods) if methods else default_methods,
        limit=limit,
        steps=steps,
        size=width_height,  # type: ignore[arg-type]
        seed=seed,
        device=device,
        dtype=dtype,
        offload=offload,
        vae_slicing=vae_slicing,
        vae_tiling=vae_tiling,
        frame_batch=frame_batch,
        overwrite=overwrite,
    )


class _Display:
    """One progress display for a whole benchmark: the items bar, the current story's steps,
    and a line per finished item printed above them."""

    def __init__(self, console: Console, show: bool, quiet: bool, verbose: int) -> None:
        self.console, self.show, self.quiet, self.verbose = console, show, quiet, verbose
        self.progress = progress_bars(console, show, info=True)
        self.items: Any = None
        self.steps: Any = None
        self.notes: set[str] = set()
        self.cut = 0  # prompts over 77 tokens: counted, shown with -v

    def __enter__(self) -> _Display:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if exc and exc[0] is not None and self.progress.live.is_started:
            # A failure: erase the bars and spinner, so the error line is the last thing shown.
            self.progress.live.transient = True
        self.progress.__exit__(*exc)
        if self.cut and not self.quiet:
            self.console.print(
                f"note: {self.cut} prompt(s) were longer than the text encoder's 77 tokens "
                "and were cut (-v lists them)",
                highlight=False,
            )

    def note(self, text: str) -> None:
        if not self.quiet and text not in self.notes:
            self.notes.add(text)
            self.progress.console.print(f"note: {escape(text)}", highlight=False, soft_wrap=True)

    def on_item(self, number: int, total: int, label: str) -> None:
        if self.items is None:
            self.items = self.progress.add_task("items", total=total, info="")
        self.progress.update(self.items, completed=number - 1, info=escape(label))

    def line(self, text: str) -> None:
        if self.show:
            self.progress.console.print(text, highlight=False, soft_wrap=True)
        if self.items is not None:
            self.progress.advance(self.items)

    @contextlib.contextmanager
    def story(self) -> Iterator[Any]:
        from storycli.keyframes.generate import Hooks

        def on_start(frames: int, steps: int) -> None:
            if self.steps is None:
                self.steps = self.progress.add_task("steps", total=steps, info="")
            self.progress.reset(self.steps, total=steps, info=f"{frames} frame(s)")

        def on_step(step: int, steps: int) -> None:
            if self.steps is not None:
                self.progress.update(self.steps, completed=step)

        def on_warning(text: str) -> None:
            if "77 tokens" in text and not self.verbose:
                self.cut += 1
            elif not self.quiet:
                self.progress.console.print(
                    f"[yellow]warning:[/] {escape(text)}", highlight=False, soft_wrap=True
                )

        def on_model(loaded: Any) -> None:
            label = "tiny random model (frames are noise)" if loaded.tiny else loaded.model_id
            self.note(f"model {label} on {loaded.device} ({loaded.dtype})")

        yield Hooks(on_model=on_model, on_start=on_start, on_step=on_step, on_warning=on_warning)

    def hooks(self) -> Any:
        from storycli.suites.common import BenchHooks

        return BenchHooks(on_note=self.note, on_item=self.on_item, story=self.story)


def _metric(value: Any) -> str:
    return "—" if value is None else f"{value:.4f}"


@bench_app.command(
    "consistory-plus",
    cls=Command,
    epilog="[bold]Examples[/]\n\n"
    "  storydiff bench consistory-plus --limit 10\n\n"
    "  storydiff bench consistory-plus --methods storydiffusion,one-prompt --out runs/cp\n\n"
    "  storydiff bench consistory-plus --model tiny --clip tiny --limit 2 --steps 2   (smoke)",
)
def consistory_plus(
    out: Out = Path("outputs/bench/consistory-plus"),
    model: Model = "sdxl",
    methods: Methods = None,
    limit: Limit = None,
    clip: Annotated[
        str,
        typer.Option(help="CLIP model for the metrics: a hub id, a local folder, or tiny (tests)."),
    ] = DEFAULT_CLIP,
    steps: Steps = None,
    size: Size = None,
    seed: Seed = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    offload: Offload = "none",
    vae_slicing: VaeSlicing = False,
    vae_tiling: VaeTiling = False,
    frame_batch: FrameBatch = None,
    overwrite: Overwrite = False,
    json_out: JsonOpt = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """ConsiStory+ (192 prompt sets of 1Prompt1Story's paper): generate each set per method,
    score CLIP-T / CLIP-I / DreamSim, and write the table of the paper's Table 1.

    Each set becomes a story (identity = style + subject, one frame per setting) under the
    paper's settings (50 steps, CFG 5, 1024², seed 42). Writes OUT/consistory_plus.md and .json
    with seconds per image and peak memory beside each metric, and the published numbers for
    comparison. A rerun skips every set that is done, without loading a model.
    """
    configure_logging(verbose, quiet)
    from storycli.evaluate.run_scores import EvaluateHooks
    from storycli.suites.consistory import run_consistory

    options = _options(
        out, model, methods, BENCH_METHODS, limit, steps, size, seed, device, dtype, offload,
        vae_slicing, vae_tiling, frame_batch, overwrite,
    )  # fmt: skip
    console = stderr_console()
    show = not (quiet or json_out)

    def work() -> Any:
        # The display ends (its bars erased on a failure) before run_guarded prints an error.
        with _Display(console, show, quiet, verbose) as display:
            hooks = display.hooks()

            def on_done(label: str, record: dict[str, Any]) -> None:
                made = (
                    "kept (done before)"
                    if record["kept"]
                    else (f"{record['frames_generated']} frame(s) generated")
                )
                m = record["metrics"]
                display.line(
                    f"{escape(label)}: {made}; CLIP-T {_metric(m['clip_t'])}, CLIP-I "
                    f"{_metric(m['clip_i'])}, DreamSim {_metric(m['dreamsim'])}"
                )

            hooks.on_done = on_done
            return run_consistory(options, clip, hooks, EvaluateHooks(on_note=display.note))

    results = run_guarded(work, verbose)
    if json_out:
        typer.echo(json.dumps(results, indent=2, ensure_ascii=False))
        return
    if not quiet:
        from storycli.suites.table import COLUMNS, PUBLISHED, consistory_rows, row_cells

        table = Table(title="ConsiStory+ (published rows: 1Prompt1Story Table 1)")
        for _, title in COLUMNS:
            method = title == "method"
            table.add_column(title, justify="left" if method else "right", no_wrap=method)
        for row in consistory_rows(results):
            table.add_row(*(escape(c) for c in row_cells(row)))
        table.add_section()
        for row in PUBLISHED:
            table.add_row(*(escape(c) for c in row_cells(row)), style="dim")
        Console(highlight=False).print(table)
        console.print(
            f"[green]done[/] {escape(str(out / 'consistory_plus.md'))} and .json written",
            highlight=False,
            soft_wrap=True,
        )


@bench_app.command(
    "vistorybench",
    cls=Command,
    epilog="[bold]Examples[/]\n\n"
    "  storydiff bench vistorybench --dataset data/dataset/ViStory\n\n"
    "  storydiff bench vistorybench --dataset data/dataset/ViStory --stories 01,05 "
    "--methods storydiffusion,none\n\n"
    "  storydiff bench vistorybench --dataset tests/fixtures/vistorybench --model tiny "
    "--steps 2   (smoke)",
)
def vistorybench(
    dataset: Annotated[
        Path,
        typer.Option(
            help="ViStoryBench's dataset folder (ViStory/, one NN/story.json per story), from "
            "`hf download ViStoryBench/ViStoryBench --repo-type dataset`.",
            show_default=False,
        ),
    ],
    out: Out = Path("outputs/bench/vistorybench"),
    model: Model = "sdxl",
    methods: Methods = None,
    limit: Limit = None,
    stories: Annotated[
        str | None,
        typer.Option(
            help="Story ids, comma-separated (e.g. the Lite split's), default: all.",
            show_default=False,
        ),
    ] = None,
    language: Annotated[str, typer.Option(help="en or ch: which texts make the prompts.")] = "en",
    timestamp: Annotated[
        str | None,
        typer.Option(
            help="The output run's timestamp folder, YYYYMMDD-HHMMSS (default: the one an "
            "earlier run of OUT chose, else now).",
            show_default=False,
        ),
    ] = None,
    steps: Steps = None,
    size: Size = None,
    seed: Seed = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    offload: Offload = "none",
    vae_slicing: VaeSlicing = False,
    vae_tiling: VaeTiling = False,
    frame_batch: FrameBatch = None,
    overwrite: Overwrite = False,
    json_out: JsonOpt = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """ViStoryBench: render its stories with storydiff and write the frames where the
    benchmark's own scorer (bench_run.py) reads them.

    Each shot's prompt is built as the benchmark's StoryDiffusion adapter builds it (camera;
    plot; static description; characters; setting; [NC] without characters). Frames go to
    OUT/outputs/storydiff/<method>/<language>/<timestamp>/<story>/shots/NN.png; the command
    prints the bench_run.py line that scores them. A rerun resumes in the same timestamp folder.
    """
    configure_logging(verbose, quiet)
    from storycli.suites.vistorybench import run_vistorybench

    options = _options(
        out, model, methods, ("storydiffusion",), limit, steps, size, seed, device, dtype,
        offload, vae_slicing, vae_tiling, frame_batch, overwrite,
    )  # fmt: skip
    ids = [s.strip() for s in stories.split(",") if s.strip()] if stories else None
    console = stderr_console()
    show = not (quiet or json_out)
    with _Display(console, show, quiet, verbose) as display:
        hooks = display.hooks()

        def on_done(label: str, record: dict[str, Any]) -> None:
            made = "kept (done before)" if record["kept"] else "rendered"
            count, where = record["shot_count"], escape(record["shots"])
            display.line(f"{escape(label)}: {made}, {count} shot(s) in {where}")

        hooks.on_done = on_done
        state = run_guarded(
            lambda: run_vistorybench(options, dataset, language, ids, timestamp, hooks), verbose
        )
    if json_out:
        typer.echo(json.dumps(state, indent=2, ensure_ascii=False))
    elif not quiet:
        console.print(
            f"[green]done[/] {len(state['stories'])} story output(s) under "
            f"{escape(state['outputs'])}; score them from a ViStoryBench checkout with:",
            highlight=False,
            soft_wrap=True,
        )
        for line in state["score_with"]:
            console.print(f"  {escape(line)}", highlight=False, soft_wrap=True)
        if state["note"]:
            console.print(f"note: {escape(state['note'])}", highlight=False, soft_wrap=True)
    if state["failed"]:
        if not quiet:
            console.print(
                f"[bold red]error:[/] {len(state['failed'])} item(s) failed: "
                f"{escape(', '.join(state['failed']))}",
                highlight=False,
                soft_wrap=True,
            )
        raise typer.Exit(EXIT_SOME_FAILED)
