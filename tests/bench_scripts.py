"""Loading and running the scripts of benchmarks/ from the tests (they are not a package)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(path: Path, name: str) -> ModuleType:
    """Import a benchmark script as module `name` (registered while it executes: dataclasses
    look their module up in sys.modules)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def run_tiny(script: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """The script's `--tiny` run (the CPU smoke mode) writing into `out`."""
    return subprocess.run(
        [sys.executable, str(script), "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
