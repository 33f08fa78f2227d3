"""Tiny repositories laid out as the Hugging Face cache holds them, for loaders' tests."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_repo(
    cache: Path,
    repo_id: str,
    source: Path,
    commit: str = COMMIT,
    patterns: Iterable[str] = ("*",),
    listing: Iterable[str] | None = None,
) -> Path:
    """Lay the files of folder `source` (those matching `patterns`) out as the cached snapshot of
    `repo_id`, as `hf download` does: content in blobs/, snapshot entries symlinked to them,
    refs/main naming the commit. `listing`: the repo's full file list, cached as the tree
    listing `hf download` writes (so the snapshot can be known to be incomplete)."""
    import fnmatch

    storage = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        name = file.relative_to(source).as_posix()
        if not any(fnmatch.fnmatch(name, p) for p in patterns):
            continue
        data = file.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    if listing is not None:
        from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

        entry = TreeCacheEntry(
            size=1, blob_id="0" * 40, lfs_sha256=None, lfs_size=None, xet_hash=None
        )
        write_tree_cache(str(storage), commit, dict.fromkeys(listing, entry))
    return snapshot


def quiet_save(module: Any, folder: Path, **kwargs: Any) -> None:
    """save_pretrained without transformers' "Writing model shards" bar on the test output."""
    from transformers.utils import logging as tlogging

    tlogging.disable_progress_bar()
    try:
        module.save_pretrained(folder, **kwargs)
    finally:
        tlogging.enable_progress_bar()


def save_tiny_ip_adapter_repo(folder: Path) -> None:
    """h94/IP-Adapter's layout, tiny: a CLIP vision tower with projection under
    models/image_encoder/ (config.json, model.safetensors, no preprocessor config, like the real
    one: it is used at CLIPImageProcessor's default 224 px), 32-d embeddings."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=224,
        patch_size=56,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = CLIPVisionModelWithProjection(config).eval()
    quiet_save(model, folder / "models" / "image_encoder")
