"""The story loop's checkpoint file: saved atomically, resumed only by the same frames."""

from __future__ import annotations

from pathlib import Path

import torch

from storycli.keyframes.checkpoints import LoopCheckpoint


def test_only_the_same_key_resumes_and_a_broken_file_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / ".story-loop.pt"
    saver = LoopCheckpoint(path, "abc", every_steps=2)
    saver.save(5, {"latents": torch.ones(2, 3)})
    assert saver.saved == [5]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    same = LoopCheckpoint(path, "abc")
    state = same.load()
    assert (
        state is not None and state["step"] == 5 and torch.equal(state["latents"], torch.ones(2, 3))
    )
    assert same.describe() == {"resumed_from_step": 5, "saved_steps": []}
    assert LoopCheckpoint(path, "other").load() is None

    path.write_bytes(b"not a checkpoint")
    assert LoopCheckpoint(path, "abc").load() is None
    saver.remove()
    assert not path.exists()


def test_due_every_n_steps_never_on_the_last() -> None:
    checkpoint = LoopCheckpoint(Path("unused"), "k", every_steps=3)
    assert [s for s in range(10) if checkpoint.due(s, 10)] == [2, 5, 8]
    assert [s for s in range(9) if checkpoint.due(s, 9)] == [2, 5]
