"""Rich progress on stderr: the bars every command uses; `generate`'s frames and steps."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from storycli.keyframes.generate import Hooks


class _TimeRemaining(TimeRemainingColumn):
    """Time left, except for tasks added with `eta=False`: counts (frames) that complete in
    uneven batches, where rich's rate-based estimate would be wrong."""

    def render(self, task: Task) -> Text:
        if not task.fields.get("eta", True):
            return Text("")
        return super().render(task)


class _LazyProgress(Progress):
    """Starts drawing with its first task: a command that fails (or has nothing to show)
    before then leaves no blank line above its error."""

    def __enter__(self) -> _LazyProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live.is_started:  # Progress.stop prints a newline even when nothing was drawn
            self.stop()

    def add_task(self, *args: Any, **kwargs: Any) -> TaskID:
        if not self.live.is_started and not self.disable:
            self.start()
        return super().add_task(*args, **kwargs)


def progress_bars(console: Console, enabled: bool, info: bool = False) -> Progress:
    """The commands' progress display; `info` adds a column for a task's `info` field."""
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    columns += [TimeElapsedColumn(), _TimeRemaining()]
    return _LazyProgress(*columns, console=console, disable=not enabled)


class StoryProgress:
    """`generate`'s display: bars, or with `lines` (a shard that is not the leader: several
    processes share one terminal or log) one plain line per event, prefixed with `lines`."""

    def __init__(
        self,
        console: Console,
        enabled: bool = True,
        warnings: bool = True,
        lines: str | None = None,
    ) -> None:
        self.console = console
        self.lines = lines
        self.enabled = enabled and lines is None
        self.warnings = warnings  # shown even when progress is off (--json): they go to stderr
        self.progress = progress_bars(console, enabled)
        self.frames_task: Any = None
        self.steps_task: Any = None

    def __enter__(self) -> StoryProgress:
        self.progress.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.progress.__exit__(exc_type, exc, tb)

    def _note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)
        elif self.lines is not None:
            self.console.print(f"{escape(self.lines)} {text}", highlight=False, soft_wrap=True)

    def _on_model(self, loaded: Any) -> None:
        if loaded.tiny:
            self._note(
                "[yellow]tiny random model[/]: for tests and smoke runs; its frames are noise"
            )
        else:
            self._note(f"model {escape(loaded.model_id)} on {loaded.device} ({loaded.dtype})")

    def _on_start(self, frames: int, steps: int) -> None:
        # Frames finish together at the end of the story loop: no time-left of their own.
        self.frames_task = self.progress.add_task("frames", total=frames, eta=False)
        self.steps_task = self.progress.add_task("steps", total=steps)
        if self.lines is not None:
            self._note(f"{frames} frame(s) to make, {steps} steps")

    def _on_call(self, description: str) -> None:
        self.progress.update(self.steps_task, description=f"steps: {escape(description)}")

    def _on_step(self, step: int, steps: int) -> None:
        self.progress.update(self.steps_task, completed=step, description="steps")

    def _on_frame(self, index: int, path: Path) -> None:
        self.progress.advance(self.frames_task)
        if self.lines is not None:
            self._note(f"{escape(str(path))} written")

    def _on_warning(self, text: str) -> None:
        if self.warnings:
            self.console.print(f"[yellow]warning:[/] {escape(text)}", highlight=False)

    def hooks(self) -> Hooks:
        return Hooks(
            on_model=self._on_model,
            on_start=self._on_start,
            on_call=self._on_call,
            on_step=self._on_step,
            on_frame=self._on_frame,
            on_warning=self._on_warning,
        )
