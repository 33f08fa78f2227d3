"""The story loop's schedule: which plan calls run in which UNet forward of every denoising
step, and at what size. Pure Python (no torch, no diffusers), so a run with nothing to do, a
shard's share of a story and `--dry-run` decide without importing the model stack."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from storycli.keyframes.plan import GenerationCall, Plan


@dataclass(frozen=True)
class RenderSize:
    width: int
    height: int


def render_size(plan: Plan, long_side: int | None) -> RenderSize:
    """The story's size, or scaled so the longer side is `long_side` (tiny model)."""
    width, height = plan.story.width, plan.story.height
    if long_side is None or max(width, height) <= long_side:
        return RenderSize(width, height)
    scale = long_side / max(width, height)
    return RenderSize(
        max(16, round(width * scale / 16) * 16), max(16, round(height * scale / 16) * 16)
    )


def calls_needed(
    plan: Plan, todo: Iterable[int], characters: Iterable[str] = ()
) -> list[GenerationCall]:
    """The pipeline calls that must run to produce the frames in `todo` (and the banks of
    `characters`, to save them).

    A reference frame needs its character's write call; so does any frame that reads that
    character's bank, even when the references themselves are already on disk.
    """
    todo = set(todo)
    if plan.story.consistency.history:  # a read frame needs the read frames before it
        todo |= {
            j
            for i in list(todo)
            if plan.frames[i].role == "read"
            for j in plan.history_before(i, every=True)
        }
    readers = {c for i in todo for c in plan.frames[i].characters} | set(characters)
    return [
        call
        for call in plan.calls
        if todo.intersection(call.frames) or (call.phase == "write" and call.character in readers)
    ]


def describe_call(call: GenerationCall) -> str:
    numbers = ", ".join(str(i + 1) for i in call.frames)
    if call.phase == "write":
        return f"references of {call.character} (frames {numbers})"
    if len(call.frames) > 1:
        return f"frames {numbers}"
    return f"frame {numbers}"


@dataclass(frozen=True)
class Chunk:
    """One UNet forward of every denoising step: the plan calls it runs together (every
    character's write call, a window call, or up to `frame_batch` read and plain calls)."""

    calls: tuple[GenerationCall, ...]
    rows: tuple[int, ...]  # the frames' rows in the story loop's batch

    @property
    def phase(self) -> str:
        """write, window, read (read calls, maybe with plain ones) or plain."""
        phases = {call.phase for call in self.calls}
        return "read" if "read" in phases else phases.pop()

    def describe(self) -> str:
        if len(self.calls) == 1 or self.phase == "write":
            return ", ".join(describe_call(call) for call in self.calls)
        numbers = ", ".join(str(i + 1) for c in self.calls for i in c.frames)
        return f"frames {numbers}"


def default_frame_batch(device_type: str) -> int:
    """Frames per UNet forward for read and plain frames: 4 on a GPU (fills it better), 2 on a
    CPU: the fastest CSA story per image measured there (`benchmarks/results/cpu-2026-12-02.md`),
    and a read forward of 2 frames is no larger than the write forward of 2 or more references,
    so the peak does not rise."""
    return 4 if device_type in ("cuda", "mps") else 2


def story_chunks(plan: Plan, calls: Iterable[GenerationCall], frame_batch: int) -> list[Chunk]:
    """Each step's forwards in order: every character's write call in one forward (each
    samples only its own references), window calls alone, then read calls of any characters
    and plain calls together, `frame_batch` calls at a time, those reading fewer banks first.
    With rolling history a read call runs alone, in story order: it reads the read frames
    before it at the same step."""
    calls = list(calls)
    row = {}
    for call in calls:
        for index in call.frames:
            row[index] = len(row)

    def chunk(group: list[GenerationCall]) -> Chunk:
        return Chunk(tuple(group), tuple(row[i] for c in group for i in c.frames))

    writes = [call for call in calls if call.phase == "write"]
    chunks = [chunk(writes)] if writes else []
    chunks += [chunk([call]) for call in calls if call.phase == "window"]
    history = plan.story.consistency.history > 0
    rest = [call for call in calls if call.phase not in ("write", "window")]
    if not history:
        # Calls reading as many banks side by side: a forward's rows then attend to as many
        # extra keys, with no padding to mask (story order within each count).
        rest.sort(
            key=lambda c: len(plan.frames[c.frames[0]].characters) if c.phase == "read" else 0
        )
    pending: list[GenerationCall] = []
    for call in rest:
        if history and call.phase == "read":
            chunks.append(chunk([call]))
            continue
        pending.append(call)
        if len(pending) == frame_batch:
            chunks.append(chunk(pending))
            pending = []
    if pending:
        chunks.append(chunk(pending))
    return chunks
