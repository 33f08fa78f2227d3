"""Checks shared by the tests of the tiny random pipelines the project builds."""

from __future__ import annotations

from typing import Any

import torch


def assert_same_weights(pipe: Any, other: Any) -> None:
    """Every torch component of two pipelines holds bit-identical weights."""
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            ours, theirs = module.state_dict(), other.components[name].state_dict()
            assert ours.keys() == theirs.keys(), name
            assert all(torch.equal(ours[key], theirs[key]) for key in ours), name
