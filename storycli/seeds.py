"""Seeds derived from a story's (or a command's) seed, one per purpose, stable across runs."""

from __future__ import annotations

import hashlib
import json


def derive_seed(seed: int, *parts: object) -> int:
    """A stable 63-bit seed for one purpose (e.g. one pipeline call's CSA draws)."""
    digest = hashlib.sha256(json.dumps([seed, *map(str, parts)]).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
