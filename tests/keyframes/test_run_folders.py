"""Run folders under concurrent, hostile or unwritable conditions (issue 20): one storydiff
process per folder (an flock a killed process does not leave stuck), stale pages and their temp
files, read-only run folders, an empty --out, and manifests pointing outside their folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cli_runs import offline_env, run_cli, storydiff_command, write_story

from storycli.render import read_png_metadata


def small_story(name: str, animal: str, frames: int = 2, layout: str = "grid") -> dict[str, Any]:
    return {
        "name": name,
        "model": "tiny",
        "identity": f"a {animal}",
        "frames": [f"the {animal} walks, scene {i} #scene {i}" for i in range(frames)],
        "steps": 1,
        "width": 128,
        "height": 96,
        "layout": layout,
        "consistency": {"method": "none"},
    }


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_error(result: Any, needle: str) -> str:
    stderr = result.stderr
    lines = error_lines(stderr)
    assert len(lines) == 1 and needle in lines[0], stderr
    assert "Traceback" not in stderr and "Traceback" not in result.stdout, stderr
    return lines[0]


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A finished two-frame run of the tiny model."""
    story = write_story(tmp_path / "fox.yaml", small_story("fox", "fox"))
    run_cli("generate", story, "--out", tmp_path / "out")
    return tmp_path / "out" / "fox"


def hold_lock(folder: Path, command: str) -> subprocess.Popen:
    """Another process holding `folder`'s lock, with `command` on its command line (as a
    storydiff process of that command has)."""
    code = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(folder), command], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def kill(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


# ------------------------------------------------------------------------------------ locking


def test_two_generates_of_different_stories_on_one_folder(tmp_path: Path) -> None:
    """Started together: one writes its story, the other is refused in one line (exit 2); the
    folder holds one consistent story."""
    out = tmp_path / "out"
    stories = [
        write_story(tmp_path / f"{animal}.yaml", small_story("same", animal, frames=3))
        for animal in ("fox", "owl")
    ]
    procs = [
        subprocess.Popen(
            [*storydiff_command(), "generate", str(story), "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=offline_env(tmp_path),
        )
        for story in stories
    ]
    results = [(p, *p.communicate(timeout=600)) for p in procs]
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, 2], [(p.returncode, err[-2000:]) for p, _, err in results]
    winner = next(k for k, (p, _, _) in enumerate(results) if p.returncode == 0)
    loser_err = results[1 - winner][2]
    lines = error_lines(loser_err)
    assert len(lines) == 1 and "Traceback" not in loser_err, loser_err
    assert "in use by another" in lines[0] or "holds frames of another story" in lines[0]
    folder = out / "same"
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["complete"] is True
    assert manifest["story_file"] == str(stories[winner].resolve())
    for entry in manifest["frames"]:
        meta = read_png_metadata(folder / entry["file"])[1]
        assert meta["key"] == entry["key"] and meta["story"] == "same"
        assert ("fox" if winner == 0 else "owl") in meta["prompt"]
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_a_held_folder_is_refused_by_every_command_and_freed_by_a_kill(run: Path) -> None:
    story = run.parent.parent / "fox.yaml"
    video = run / "video"
    video.mkdir()
    holder = hold_lock(run, "generate")
    try:
        snapshot = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
        for args in (
            ("generate", story, "--out", run.parent),
            ("pages", run, "--layout", "four-panel"),
            ("evaluate", run, "--clip", "tiny"),
        ):
            result = run_cli(*args, code=2)
            line = assert_one_error(result, "is in use by another `storydiff generate` run")
            assert str(run) in line
        assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == snapshot
    finally:
        kill(holder)  # SIGKILL: the kernel drops its lock
    holder = hold_lock(video, "evaluate")
    try:
        result = run_cli("animate", run, code=2)
        assert_one_error(result, f"{video} is in use by another `storydiff evaluate` run")
        assert not list(video.iterdir())
    finally:
        kill(holder)
    run_cli("pages", run, "--layout", "four-panel")
    run_cli("generate", story, "--out", run.parent)
    run_cli("animate", run)
    assert (video / "story.mp4").is_file()


# -------------------------------------------------------------------------------------- pages


def test_pages_removes_its_stale_pages_and_temp_files(tmp_path: Path) -> None:
    story = write_story(tmp_path / "fox.yaml", small_story("fox", "fox", frames=6))
    out = tmp_path / "out"
    run_cli("generate", story, "--out", out)
    folder = out / "fox"

    def pages() -> list[str]:
        return sorted(p.name for p in folder.glob("page_*.png"))

    def listed() -> list[str]:
        return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["pages"]

    assert pages() == ["page_01.png"] == listed()
    run_cli("pages", folder, "--layout", "four-panel")
    assert pages() == ["page_01.png", "page_02.png"] == listed()
    run_cli("pages", folder, "--layout", "grid")
    assert pages() == ["page_01.png"] == listed()
    run_cli("pages", folder, "--layout", "four-panel")
    run_cli("generate", story, "--out", out)  # the story's layout: grid again
    assert pages() == ["page_01.png"] == listed()
    # What a `kill -9` during pages leaves; a file that is not ours stays.
    ours = [folder / ".page_05.png.0123456789ab.tmp", folder / ".comic.pdf.0123456789ab.tmp"]
    theirs = folder / ".notes.txt.0123456789ab.tmp"
    for path in [*ours, theirs]:
        path.write_bytes(b"partial")
    run_cli("pages", folder)
    assert not any(p.exists() for p in ours) and theirs.exists()
    # A page storydiff did not write (not in the manifest) is never removed.
    (folder / "page_07.png").write_bytes(b"mine")
    run_cli("pages", folder, "--layout", "four-panel")
    run_cli("pages", folder, "--layout", "grid")
    assert (folder / "page_07.png").read_bytes() == b"mine"


# ------------------------------------------------------------------------ read-only run folder


@pytest.fixture
def read_only_run(run: Path, tmp_path: Path) -> Any:
    """The run seen through a read-only bind mount (read-only even for root)."""
    view = tmp_path / "ro-view"
    view.mkdir()
    made = subprocess.run(
        ["mount", "--bind", "-o", "ro", str(run), str(view)], capture_output=True, text=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here: {made.stderr.strip()}")
    try:
        if os.access(view, os.W_OK) and not _really_read_only(view):
            pytest.skip("the bind mount is not read-only on this kernel")
        yield view
    finally:
        subprocess.run(["umount", str(view)], check=False)


def _really_read_only(folder: Path) -> bool:
    try:
        (folder / ".probe").write_bytes(b"")
    except OSError:
        return True
    (folder / ".probe").unlink()
    return False


@pytest.mark.parametrize("command", ["pages", "evaluate"])
def test_read_only_run_folder_is_one_sentence_before_any_work(
    read_only_run: Path, command: str
) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in read_only_run.iterdir()}
    args = ("--layout", "four-panel") if command == "pages" else ("--clip", "tiny")
    result = run_cli(command, read_only_run, *args, code=2)
    line = assert_one_error(result, "cannot write there")
    assert str(read_only_run) in line
    assert "CLIP" not in result.stderr  # refused before any metric
    assert {p.name: p.stat().st_mtime_ns for p in read_only_run.iterdir()} == before


# ---------------------------------------------------------------------------------- empty --out


@pytest.mark.parametrize(
    "args",
    [
        ("generate", "{story}", "--out", ""),
        ("generate", "{story}", "-o", ""),
        ("generate", "{story}", "--out="),
        ("animate", "{run}", "--out", ""),
        ("train-predictor", "--data", "{run}", "--out", ""),
    ],
)
def test_empty_out_is_refused(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...]
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    story = run.parent.parent / "fox.yaml"
    filled = [a.format(story=story, run=run) for a in args]
    result = run_cli(*filled, code=2)
    assert_one_error(result, '--out ""')
    assert not list(cwd.iterdir())


# ------------------------------------------------------------------- manifest paths outside


@pytest.mark.parametrize("name", ["../outside.png", "{abs}"])
@pytest.mark.parametrize("command", ["pages", "evaluate"])
def test_manifest_paths_outside_the_run_folder_are_refused(
    run: Path, tmp_path: Path, command: str, name: str
) -> None:
    outside = run.parent / "outside.png"
    outside.write_bytes((run / "frame_01.png").read_bytes())
    manifest_path = run / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    entry = name.format(abs=outside)
    manifest["frames"][1]["file"] = entry
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    args = ("--layout", "four-panel") if command == "pages" else ("--clip", "tiny")
    result = run_cli(command, run, *args, code=2)
    line = assert_one_error(result, "frames[1].file")
    assert entry in line and "manifest.json" in line
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
    # A link inside the folder that leads out of it is not the folder's own file either.
    manifest["frames"][1]["file"] = "link.png"
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    (run / "link.png").symlink_to(outside)
    result = run_cli(command, run, *args, code=2)
    assert_one_error(result, "frames[1].file 'link.png'")
