"""Running storydiff from the tests: in process (`run_cli`), as a subprocess
(`storydiff_command`, `offline_env`), and reading what it wrote (`pixels`)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image
from typer.testing import CliRunner

from storycli.cli import app


def write_story(path: Path, story: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(story, sort_keys=False), encoding="utf-8")
    return path


def run_cli(*args: str | Path, code: int = 0) -> Any:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (
        f"exit {result.exit_code}, expected {code}\nstdout:\n{result.stdout}\n"
        f"stderr:\n{result.stderr}\nexception: {result.exception!r}"
    )
    return result


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).copy()


def storydiff_command() -> list[str]:
    script = Path(sys.executable).with_name("storydiff")
    if script.is_file():
        return [str(script)]
    found = shutil.which("storydiff")
    assert found, "the storydiff console script is not installed"
    return [found]


def offline_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a subprocess: offline, with an empty Hugging Face cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env |= {
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "PYTHONWARNINGS": "ignore",
        "COLUMNS": "200",
    }
    return env
