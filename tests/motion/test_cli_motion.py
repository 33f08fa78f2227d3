"""`storydiff train-predictor` from the command line: a tiny run, resume, and bad input."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from storycli.cli import app
from storycli.motion.predictor.model import load_predictor
from storycli.motion.video.synthetic import write_synthetic_dataset

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
    assert summary["schema_version"] == 1
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


def test_short_run_notes_the_warmup_and_json_has_a_schema_version(data, tmp_path):
    out = tmp_path / "run"
    result = train("--data", str(data), "--out", str(out), "--max-steps", "2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["schema_version"] == 1
    # ARGS warm up over 5 steps: a note on stderr, which --json leaves for notes.
    notes = [line for line in result.stderr.splitlines() if "warmup" in line]
    assert len(notes) == 1 and "never reaches its peak" in notes[0], result.stderr


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """chmod 0o555; for root, whom chmod does not stop, also the immutable flag."""
    folder.chmod(0o555)
    immutable = False
    try:
        probe = folder / "probe"
        try:
            probe.touch()
        except PermissionError:
            pass  # not root: chmod is enough
        else:
            probe.unlink()
            chattr = shutil.which("chattr")
            immutable = (
                chattr is not None and subprocess.run([chattr, "+i", str(folder)]).returncode == 0
            )
            if not immutable:
                pytest.skip("root writes through chmod here and chattr +i is unavailable")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_read_only_data_folder_is_one_clear_error_before_encoding(tmp_path):
    data, out = tmp_path / "readonly", tmp_path / "run"
    write_synthetic_dataset(data, videos=3, seconds=2.5, fps=8, seed=2)
    with read_only(data):
        result = train("--data", str(data), "--out", str(out), "--max-steps", "2")
        assert result.exit_code == 2, result.output
        text = " ".join(result.output.split())
        assert text.count("error:") == 1 and "not writable" in text and "--cache DIR" in text
        assert str(data / ".storydiff-cache") in text
        assert "Traceback" not in text and "embeddings" not in text  # nothing was encoded
        assert not out.exists()
        cache = tmp_path / "cache"
        fixed = train(
            "--data", str(data), "--out", str(out), "--max-steps", "2", "--cache", str(cache)
        )
        assert fixed.exit_code == 0, fixed.output
    assert len(list(cache.glob("*.safetensors"))) == 3
    assert sorted(p.name for p in data.iterdir()) == [f"video_{i:03d}.mp4" for i in range(3)]


# ------------------------------------------------------------------ killed for real, then rerun

ROOT = Path(__file__).resolve().parents[2]


def start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """`storydiff ARGS` in a real process, from this checkout, one torch thread."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "NO_COLOR": "1",
    }
    code = "from storycli.cli import main; main()"
    with log.open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-c", code, *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], log: Path) -> None:
    deadline = time.monotonic() + 300
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"exited ({proc.returncode}) before it was killed: {log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the moment to kill")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


def temp_like(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-")}


def test_killed_runs_continue_with_the_same_command_and_leave_no_temp_files(tmp_path):
    data, out = tmp_path / "D", tmp_path / "R"
    write_synthetic_dataset(data, videos=8, seconds=3.0, fps=8, seed=7)
    cache = data / ".storydiff-cache"
    command = [
        "train-predictor", "--data", "D", "--out", "R", "--encoder", "tiny", "--device", "cpu",
        "--frames", "8", "--batch-size", "16", "--max-steps", "60", "--eval-every", "20",
        "--checkpoint-every", "5", "--val-fraction", "0.3", "--json",
    ]  # fmt: skip
    log = tmp_path / "stderr.txt"

    # (a) Killed while the embeddings are encoded, before any checkpoint.
    proc = start(command, tmp_path, log)
    kill_when(proc, lambda: any(cache.glob("*.safetensors")), log)
    assert not (out / "checkpoints").exists()
    theirs = {  # someone else's files, some looking like temp files: never touched
        cache / ".notes.txt.0123456789ab.tmp",
        cache / "keep.tmp",
        data / ".draft.mp4.0123456789ab.tmp",
    }
    planted = {  # what a kill mid-write leaves (a real kill may or may not leave these)
        cache / f".{'a' * 32}.safetensors.0123456789ab.tmp",
        cache / ".index.json.0123456789ab.tmp",
    }
    for path in theirs | planted:
        path.write_bytes(b"half")

    # (b) The same command with --resume: nothing to resume yet; killed after a checkpoint.
    proc = start([*command, "--resume"], tmp_path, log)
    kill_when(proc, lambda: any((out / "checkpoints").glob("step_*/state.pt")), log)
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    more_theirs = {out / ".notes.txt.0123456789ab.tmp", out / "draft.tmp"}
    more_planted = {out / ".metrics.json.0123456789ab.tmp", out / ".run.json.0123456789ab.tmp"}
    for path in more_theirs | more_planted:
        path.write_bytes(b"half")
    (out / "checkpoints" / ".step_000055.0123456789ab.tmp").mkdir()  # a checkpoint being made

    # The same command again, without --resume: it continues the run it made itself.
    proc = start(command, tmp_path, log)
    stdout, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log.read_text()
    summary = json.loads(stdout)
    assert summary["schema_version"] == 1 and summary["steps"] == 60
    assert summary["resumed_from"] and summary["resumed_from"] % 5 == 0
    assert summary["counts"]["encoded"] == 0 and summary["counts"]["cached"] == 8
    notes = " ".join(log.read_text().split())
    assert "unfinished run" in notes and "resuming from step_" in notes
    left = temp_like(out) | temp_like(cache)
    assert left == {p for p in theirs | more_theirs if p.parent != data}, left
    assert all(p.exists() for p in theirs | more_theirs)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000055", "step_000060"]
