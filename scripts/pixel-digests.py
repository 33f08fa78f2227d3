#!/usr/bin/env python3
"""Render every example story on the tiny model and print a digest of each image's pixels.

A refactor that must not change behaviour keeps these digests bit-identical: record them before,
compare after (the digests depend on the torch build and thread count, so compare on one machine).

    scripts/pixel-digests.py > before.json           # on the old tree
    scripts/pixel-digests.py --check before.json     # on the new tree: exit 1 on any difference

Stories with an `ip_adapter:` get `model: tiny` under it (the tiny random adapter), as their
comments suggest for a machine without the weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def _tiny_adapters(node: Any) -> None:
    """Point every ip_adapter block of a story at the tiny random adapter, in place."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "ip_adapter" and isinstance(value, dict):
                value["model"] = "tiny"
            _tiny_adapters(value)
    elif isinstance(node, list):
        for item in node:
            _tiny_adapters(item)


def render(work: Path) -> Path:
    """Copy stories/ into WORK, render them all on the tiny model, return the output root."""
    stories = work / "stories"
    shutil.copytree(ROOT / "stories", stories)
    for path in stories.glob("*.yaml"):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        _tiny_adapters(data)
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    out = work / "out"
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "storycli", "generate", str(stories), "--model", "tiny"]
    subprocess.run(
        [*command, "--out", str(out), "--quiet", "--json"],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    return out


def digests(out: Path) -> dict[str, str]:
    """sha256 of each PNG's decoded RGB(A) pixels, keyed by its path under OUT."""
    result = {}
    for path in sorted(out.rglob("*.png")):
        with Image.open(path) as image:
            array = np.asarray(image)
        key = path.relative_to(out).as_posix()
        result[key] = hashlib.sha256(array.tobytes() + str(array.shape).encode()).hexdigest()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", type=Path, help="compare with digests recorded earlier")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        found = digests(render(Path(work)))
    if args.check is None:
        print(json.dumps(found, indent=1))
        return 0
    recorded = json.loads(args.check.read_text(encoding="utf-8"))
    differ = sorted(k for k in recorded.keys() | found.keys() if recorded.get(k) != found.get(k))
    for key in differ:
        print(f"differs: {key}", file=sys.stderr)
    print(f"{len(found)} images, {len(differ)} differ", file=sys.stderr)
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
