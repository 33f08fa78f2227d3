"""Which share of the work this process does: `--shard INDEX/COUNT`, or the launcher's
environment (torchrun and `accelerate launch`: RANK / WORLD_SIZE; SLURM job arrays:
SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT; `srun` tasks: SLURM_PROCID / SLURM_NTASKS).

Work is assigned over the sorted list of everything named, before finished work is skipped, so
a process that restarts gets the same share and redoes only its own unfinished work. No process
talks to another: nothing here needs a rendezvous, so a failed rank never hangs the others.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from storycli.errors import InvalidInput

T = TypeVar("T")
SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


class ShardError(InvalidInput):
    """A `--shard` value or launcher variables that do not describe a share."""


@dataclass(frozen=True)
class Shard:
    index: int = 0  # 0-based
    count: int = 1
    local_index: int = 0  # the process's number on its machine: which GPU it takes
    source: str = "single process"  # where the numbers came from, for messages

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ShardError(
                f"shard {self.index}/{self.count} ({self.source}): INDEX must be 0 … COUNT−1 "
                "and COUNT at least 1, e.g. --shard 0/4"
            )

    @property
    def active(self) -> bool:
        return self.count > 1

    @property
    def leader(self) -> bool:
        """The process that draws progress bars (the others log lines)."""
        return self.index == 0

    @property
    def label(self) -> str:
        return f"shard {self.index}/{self.count}"

    def take(self, items: Sequence[T]) -> list[T]:
        """This shard's items of the sorted list: every COUNT-th, starting at INDEX (round
        robin keeps shares even when items are sorted by size or date)."""
        return list(items[self.index :: self.count])

    def owns(self, position: int) -> bool:
        return position % self.count == self.index


def parse_shard(value: str) -> Shard:
    match = SHARD_RE.match(value)
    if not match:
        raise ShardError(f"--shard {value}: write INDEX/COUNT with INDEX from 0, e.g. --shard 1/4")
    return Shard(int(match[1]), int(match[2]), source=f"--shard {value}")


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ShardError(f"environment variable {name}={env[name]!r} is not a number") from None


def shard_from_env(env: Mapping[str, str] | None = None) -> Shard:
    """The share a launcher gave this process, or the whole work when none did."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and "RANK" in env:
        # torchrun and `accelerate launch` set these (and LOCAL_RANK).
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        return Shard(_int(env, "RANK"), _int(env, "WORLD_SIZE"), local, source="RANK / WORLD_SIZE")
    if "SLURM_ARRAY_TASK_ID" in env:
        count = _array_count(env)
        return Shard(_array_index(env), count, 0, source="SLURM job array")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        return Shard(
            _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), local, source="SLURM tasks"
        )
    return Shard()


def _array_index(env: Mapping[str, str]) -> int:
    """The task's position in the array: arrays may start at any number and step (--array=1-8,
    --array=0-15:4)."""
    low = _int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
    step = _int(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
    return (_int(env, "SLURM_ARRAY_TASK_ID") - low) // max(step, 1)


def _array_count(env: Mapping[str, str]) -> int:
    if "SLURM_ARRAY_TASK_COUNT" in env:
        return _int(env, "SLURM_ARRAY_TASK_COUNT")
    if "SLURM_ARRAY_TASK_MAX" in env:
        low = _int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        step = _int(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
        return (_int(env, "SLURM_ARRAY_TASK_MAX") - low) // max(step, 1) + 1
    raise ShardError(
        "SLURM_ARRAY_TASK_ID is set but not SLURM_ARRAY_TASK_COUNT: pass --shard INDEX/COUNT"
    )


def resolve_shard(option: str | None, env: Mapping[str, str] | None = None) -> Shard:
    """`--shard` when given, else the environment's."""
    return parse_shard(option) if option else shard_from_env(env)


def shard_device(device: str, shard: Shard, cuda_count: int) -> str:
    """Each process on a machine takes its own GPU: `auto`/`cuda` become cuda:LOCAL_INDEX when
    several shards run and the GPUs are visible to all of them; an explicit cuda:N stays."""
    if not shard.active or device not in ("auto", "cuda") or cuda_count == 0:
        return device
    return f"cuda:{shard.local_index % cuda_count}"


def assign(items: Sequence[T], shard: Shard) -> tuple[list[T], Shard]:
    """(the items this process renders, the share of one story's frames it makes). Several
    items are dealt out whole; one item with several shards is shared frame by frame."""
    if len(items) == 1 and shard.active:
        return list(items), shard
    return shard.take(items), Shard()
