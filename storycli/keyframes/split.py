"""One story's frames shared over several processes, with pixels equal to a one-process run.

The share is made of whole chunks of the story loop (the UNet forwards of one step), as one
process would form them over the whole story: a process's chunks then run exactly the forwards
a single process runs for them, with the same inputs, so its frames come out bit for bit the
same. Every process runs the references its frames read (identical work, cheap next to the
rest); only the leader writes the reference frames' files. A window-mode story is one call over
every frame, so it cannot be shared: the leader makes it whole.
"""

from __future__ import annotations

from storycli.batch.shard import Shard
from storycli.keyframes.plan import Plan
from storycli.keyframes.schedule import story_chunks


def frames_of_shard(plan: Plan, frame_batch: int, shard: Shard) -> set[int]:
    """The frame indices whose files this shard writes (all of them for one process)."""
    owned: set[int] = set()
    if plan.story.consistency.history:
        # Every read frame reads the one before it at the same step: not shareable.
        return set(range(len(plan.frames))) if shard.leader else owned
    position = 0
    for chunk in story_chunks(plan, plan.calls, frame_batch):
        frames = {i for call in chunk.calls for i in call.frames}
        if chunk.phase == "write":
            if shard.leader:
                owned |= frames
            continue
        if shard.owns(position):
            owned |= frames
        position += 1
    return owned
