"""`storydiff train-predictor` from the command line: a tiny run, resume, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from storycli.cli import app
from storycli.motion.predictor import load_predictor
from storycli.motion.synthetic import write_synthetic_dataset

ARGS = [
    "--encoder", "tiny", "--device", "cpu", "--frames", "8", "--batch-size", "16",
    "--lr", "1e-3", "--warmup-steps", "5", "--eval-every", "10", "--checkpoint-every", "10",
    "--val-fraction", "0.3",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    write_synthetic_dataset(folder, videos=6, seconds=3.0, fps=8, seed=5, frame_folders=1)
    return folder


def train(*extra: str):
    return CliRunner().invoke(app, ["train-predictor", *ARGS, *extra])


def test_train_resume_and_json_summary(data, tmp_path):
    out = tmp_path / "run"
    first = train("--data", str(data), "--out", str(out), "--max-steps", "10")
    assert first.exit_code == 0, first.output
    assert "gain over lerp" in first.output and "embeddings" in first.output
    records = json.loads((out / "metrics.json").read_text())
    assert [r["step"] for r in records] == [0, 10]
    keys = {"val_mse_predictor", "val_mse_lerp", "val_mse_slerp", "val_cos_predictor"}
    assert keys | {"val_cos_lerp", "gain"} <= set(records[-1])

    more = train("--data", str(data), "--out", str(out), "--max-steps", "20", "--resume", "--json")
    assert more.exit_code == 0, more.output
    summary = json.loads(more.stdout)
    assert summary["steps"] == 20 and summary["resumed_from"] == 10
    assert summary["counts"]["encoded"] == 0  # the cache from the first run was used
    assert [r["step"] for r in json.loads((out / "metrics.json").read_text())] == [0, 10, 20]
    assert load_predictor(Path(summary["predictor"]), expect_dim=32).config.frames == 8

    again = train("--data", str(data), "--out", str(out), "--max-steps", "20")
    assert again.exit_code == 2  # another run is there: no silent overwrite
    assert "--resume" in again.output or "--overwrite" in again.output


def test_folder_without_usable_videos_is_one_clear_error(tmp_path):
    data = tmp_path / "empty"
    data.mkdir()
    (data / "notes.txt").write_text("no videos here")
    (data / "broken.mp4").write_bytes(b"not a video at all")
    result = train("--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "5")
    assert result.exit_code == 2
    assert result.output.count("error:") == 1 and str(data) in result.output.replace("\n", "")
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_missing_data_folder(tmp_path):
    result = train("--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    assert "nope" in result.output and "Traceback" not in result.output


def test_uncached_encoder_offline_is_missing_weights(data, tmp_path, hub_offline):
    args = ["train-predictor", "--data", str(data), "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, [*args, "--encoder", "openclip-vit-h", "--device", "cpu"])
    assert result.exit_code == 1
    assert "hf download h94/IP-Adapter" in result.output.replace("\n", "")
    assert not (tmp_path / "run").exists()
