"""Run a list of stories (or keyframe folders) one after another, each failure isolated.

Every item ends as a `BatchItem`: done, invalid (the user can fix the input: exit code 2),
failed (the machine or its files: 1), or not run (after `--fail-fast` stopped the batch). The
batch's exit code follows from them (`batch_exit_code`). With a log folder, each item's own
log lines, its outcome and any traceback go to `<log dir>/<item>.log`.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storycli.config import ConfigFileError
from storycli.errors import (
    EXIT_INVALID,
    EXIT_OK,
    EXIT_RUNTIME,
    EXIT_SOME_FAILED,
    InvalidInput,
    RuntimeProblem,
)
from storycli.story.loader import StoryError

DONE, INVALID, FAILED, NOT_RUN = "done", "invalid", "failed", "not run"


def describe_failure(exc: BaseException) -> tuple[int, list[str]]:
    """The exit code and message lines of a failure: 2 for input the user can fix, 1 for the
    rest; an unforeseen exception names its type (a bug, or an environment problem)."""
    if isinstance(exc, StoryError):
        return EXIT_INVALID, exc.lines()
    if isinstance(exc, (InvalidInput, ConfigFileError)):
        return EXIT_INVALID, [str(exc)]
    if isinstance(exc, RuntimeProblem):
        return EXIT_RUNTIME, [str(exc)]
    return EXIT_RUNTIME, [f"{type(exc).__name__}: {exc} (run again with -v for the traceback)"]


@dataclass
class BatchItem:
    item: Path
    status: str = NOT_RUN
    exit_code: int = EXIT_OK
    errors: list[str] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)  # what the item's work returned
    seconds: float = 0.0
    exception: BaseException | None = field(default=None, repr=False)  # for -v tracebacks

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema_version": 1,
            "input": str(self.item),
            "status": self.status,
            "exit_code": self.exit_code,
        }
        if self.errors:
            out["errors"] = self.errors
        return out | self.record


def batch_exit_code(items: Sequence[BatchItem]) -> int:
    """0 when every item is done; one item: its own code; every item invalid: 2 (nothing was
    even attempted); any other mix with a failure: EXIT_SOME_FAILED."""
    if all(i.status == DONE for i in items):
        return EXIT_OK
    if len(items) == 1:
        return items[0].exit_code
    if all(i.status == INVALID for i in items):
        return EXIT_INVALID
    return EXIT_SOME_FAILED


class ItemLog:
    """One item's log file, `<log dir>/<name>.log`, appended to (reruns add to the same file,
    so a log tells an item's whole history): the batch's own lines, and storydiff's log
    records at the level the command runs at (warnings; everything with -v)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(path, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def write(self, level: int, message: str) -> None:
        self.handler.emit(logging.LogRecord("storycli.batch", level, "", 0, message, None, None))


@contextmanager
def item_log(log_dir: Path | None, name: str) -> Iterator[ItemLog | None]:
    if log_dir is None:
        yield None
        return
    log = ItemLog(log_dir / f"{name}.log")
    logger = logging.getLogger("storycli")
    logger.addHandler(log.handler)
    try:
        yield log
    finally:
        logger.removeHandler(log.handler)
        log.handler.close()


def run_batch(
    items: Sequence[Path],
    work: Callable[[Path], dict[str, Any]],
    on_done: Callable[[BatchItem], None] | None = None,
    fail_fast: bool = False,
    log_dir: Path | None = None,
    log_name: Callable[[Path], str] = lambda item: item.stem,
) -> list[BatchItem]:
    """Run `work(item)` for each item in order. KeyboardInterrupt stops the batch (finished
    files are kept); any other exception is that item's failure only."""
    results = [BatchItem(item) for item in items]
    for result in results:
        started = time.perf_counter()
        with item_log(log_dir, log_name(result.item)) as log:
            if log is not None:
                log.write(logging.INFO, f"start {result.item}")
            try:
                result.record = work(result.item)
                result.status = DONE
            except KeyboardInterrupt:
                if log is not None:
                    log.write(logging.WARNING, "interrupted")
                raise
            except Exception as exc:
                result.exception = exc
                result.exit_code, result.errors = describe_failure(exc)
                result.status = INVALID if result.exit_code == EXIT_INVALID else FAILED
                if log is not None:
                    log.write(logging.ERROR, "\n".join(result.errors))
                    log.write(logging.DEBUG, traceback.format_exc().rstrip())
            result.seconds = time.perf_counter() - started
            if log is not None:
                outcome = json.dumps(result.to_json(), ensure_ascii=False)
                log.write(logging.INFO, f"{result.status} in {result.seconds:.1f} s: {outcome}")
        if on_done is not None:
            on_done(result)
        if fail_fast and result.status != DONE:
            break
    return results
