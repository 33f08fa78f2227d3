"""Batch runs, sharding and the batch scripts, with the tiny random model (CPU, offline).

Everything runs for real: several story files through `storydiff generate` in one process (one
model load, each failure isolated), shares computed from launcher variables, two real
processes under `torchrun --nproc_per_node 2`, and the shell scripts in scripts/ (which must
also pass shellcheck).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from cli_runs import run_cli
from PIL import Image

import storycli.keyframes.models
import storycli.motion.decoders.registry
from storycli.batch.inputs import InputError, expand_keyframe_folders, expand_stories
from storycli.batch.runner import BatchItem, batch_exit_code
from storycli.batch.shard import Shard, ShardError, assign, parse_shard, shard_from_env
from storycli.config import Configs
from storycli.errors import EXIT_INVALID, EXIT_OK, EXIT_RUNTIME, EXIT_SOME_FAILED
from storycli.keyframes.plan import build_plan
from storycli.keyframes.schedule import story_chunks
from storycli.keyframes.split import frames_of_shard
from storycli.story.loader import load_story

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.usefixtures("one_thread")


def story(name: str, frames: int = 4, **changes: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name,
        "model": "tiny",
        "characters": {"Ann": "a woman with red hair", "Bob": "a man with a blue hat"},
        "frames": [f"[{'Ann' if i % 2 == 0 else 'Bob'}] scene {i}" for i in range(frames)],
        "seed": 5,
        "width": 256,
        "height": 192,
        "steps": 2,
        "scheduler": "euler",
        "consistency": {"method": "storydiffusion", "id_length": 1},
    }
    out.update(changes)
    return out


def write(folder: Path, file: str, data: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("frame_*.png"))}


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A subprocess environment: offline, no launcher variables from the test runner itself,
    the venv's commands first on PATH."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_", "MASTER_")
    out = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    out |= {
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "PYTHONWARNINGS": "ignore",
        "COLUMNS": "200",
        "OMP_NUM_THREADS": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    return out | extra


@pytest.fixture
def count_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every real pipeline load, counted (the real loader runs)."""
    loads: list[str] = []
    real = storycli.keyframes.models.load_pipeline

    def counted(model: str, *args: Any, **kwargs: Any) -> Any:
        loads.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(storycli.keyframes.models, "load_pipeline", counted)
    return loads


# ------------------------------------------------------------------------------- batch runs


def test_folder_with_a_broken_story_renders_the_good_ones(
    tmp_path: Path, count_loads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    stories = tmp_path / "stories"
    write(stories, "a.yaml", story("alpha"))
    write(stories, "b_broken.yaml", story("broken", model="./weights/missing.safetensors"))
    write(stories, "c.yaml", story("gamma"))
    out = tmp_path / "out"
    result = run_cli("generate", stories, "--out", out, "--json", code=EXIT_SOME_FAILED)

    records = json_lines(result.stdout)
    assert [Path(r["input"]).name for r in records] == ["a.yaml", "b_broken.yaml", "c.yaml"]
    assert [r["status"] for r in records] == ["done", "invalid", "done"]
    assert records[1]["exit_code"] == EXIT_INVALID
    assert "missing.safetensors" in records[1]["errors"][0]
    assert "missing.safetensors" in result.stderr  # named on stderr as well
    for name in ("alpha", "gamma"):
        assert len(pixels(out / name)) == 4 and (out / name / "grid.png").is_file()
    assert not (out / "broken").exists()  # nothing half-written
    # One model load for the two stories sharing the model.
    assert count_loads == ["tiny"]
    assert [r.get("model_reused") for r in records] == [False, None, True]

    # The summary table names the broken story (as the user named it: relative here).
    os.chdir(tmp_path)
    result = run_cli("generate", "stories", "--out", out, code=EXIT_SOME_FAILED)
    summary = result.stderr[result.stderr.index("summary") :]
    assert "b_broken.yaml" in summary and "invalid" in summary and "2 of 3 done" in summary

    # Finished stories are skipped on a rerun (a glob this time, quoted: the tool expands it).
    result = run_cli("generate", str(stories / "[ac].yaml"), "--out", out, "--json")
    records = json_lines(result.stdout)
    assert [r["name"] for r in records] == ["alpha", "gamma"]
    assert all(f["status"] == "skipped" for r in records for f in r["frames"])


def test_fail_fast_and_exit_codes(tmp_path: Path, count_loads: list[str]) -> None:
    stories = tmp_path / "stories"
    write(stories, "a_broken.yaml", story("broken", steps=0))
    write(stories, "b.yaml", story("beta"))
    out = tmp_path / "out"
    result = run_cli("generate", stories, "--out", out, "--json", "--fail-fast", code=3)
    assert [r["status"] for r in json_lines(result.stdout)] == ["invalid"]
    assert not out.exists() and count_loads == []

    # Every story invalid: 2, as for one invalid story.
    write(stories, "b.yaml", story("beta", width=-1))
    run_cli("generate", stories, "--out", out, code=EXIT_INVALID)
    assert not out.exists()

    done, invalid, failed = (BatchItem(Path(n)) for n in "abc")
    done.status = "done"
    invalid.status, invalid.exit_code = "invalid", EXIT_INVALID
    failed.status, failed.exit_code = "failed", EXIT_RUNTIME
    assert batch_exit_code([done, done]) == EXIT_OK
    assert batch_exit_code([failed]) == EXIT_RUNTIME
    assert batch_exit_code([invalid, invalid]) == EXIT_INVALID
    assert batch_exit_code([done, failed]) == EXIT_SOME_FAILED
    assert batch_exit_code([invalid, failed]) == EXIT_SOME_FAILED


def test_log_dir_keeps_one_log_per_story(tmp_path: Path) -> None:
    stories = tmp_path / "stories"
    write(stories, "a.yaml", story("alpha", frames=2))
    write(stories, "b.yaml", story("beta", frames=2, steps=0))
    logs = tmp_path / "logs"
    run_cli("generate", stories, "--out", tmp_path / "out", "--log-dir", logs, code=3)
    good, bad = (logs / "a.log").read_text(), (logs / "b.log").read_text()
    assert "start" in good and '"status": "done"' in good and "Traceback" not in good
    assert "steps" in bad and '"status": "invalid"' in bad and "Traceback" in bad


def test_inputs_expand_folders_and_globs_in_sorted_order(tmp_path: Path) -> None:
    write(tmp_path / "s", "b.yaml", story("b"))
    write(tmp_path / "s", "a.yml", story("a"))
    write(tmp_path / "s", "c.yaml", story("c"))
    (tmp_path / "s" / "notes.txt").write_text("not a story")
    found = expand_stories([tmp_path / "s" / "c.yaml", tmp_path / "s", str(tmp_path / "s/*.y*")])
    assert [p.name for p in found] == ["a.yml", "b.yaml", "c.yaml"]  # sorted, no duplicates
    with pytest.raises(InputError, match="no file matches"):
        expand_stories([str(tmp_path / "none-*.yaml")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no story files"):
        expand_stories([tmp_path / "empty"])
    result = run_cli("generate", tmp_path / "empty", code=EXIT_INVALID)
    assert "no story files" in result.stderr

    # Keyframe folders: a run folder is one; a folder of run folders gives each.
    for name in ("r2", "r1"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "manifest.json").write_text("{}")
    (tmp_path / "pics").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "pics" / "x.png")
    folders = expand_keyframe_folders([tmp_path / "runs", tmp_path / "pics"])
    assert [p.name for p in folders] == ["pics", "r1", "r2"]


# --------------------------------------------------------------------------------- sharding


def test_shards_from_options_and_launcher_variables() -> None:
    assert parse_shard("1/4") == Shard(1, 4, source="--shard 1/4")
    for bad in ("4/4", "1", "-1/2", "a/b", "0/0"):
        with pytest.raises(ShardError):
            parse_shard(bad)
    assert shard_from_env({}) == Shard()
    torchrun = shard_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (torchrun.index, torchrun.count, torchrun.local_index) == (3, 4, 1)
    array = shard_from_env(
        {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "8"}
    )
    assert (array.index, array.count) == (4, 8)
    stepped = shard_from_env(
        {"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_MAX": "12", "SLURM_ARRAY_TASK_STEP": "4"}
    )
    assert (stepped.index, stepped.count) == (2, 4)
    tasks = shard_from_env({"SLURM_PROCID": "2", "SLURM_NTASKS": "3", "SLURM_LOCALID": "0"})
    assert (tasks.index, tasks.count) == (2, 3)
    with pytest.raises(ShardError, match="RANK"):
        shard_from_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ShardError, match="SLURM_ARRAY_TASK_COUNT"):
        shard_from_env({"SLURM_ARRAY_TASK_ID": "0"})


def test_every_story_and_frame_has_exactly_one_shard(tmp_path: Path) -> None:
    items = [f"story-{i}" for i in range(7)]
    for count in range(1, 5):
        shares = [assign(items, Shard(i, count))[0] for i in range(count)]
        assert sorted(s for share in shares for s in share) == sorted(items)
    # One story over several shards: its frames are shared, by whole story-loop chunks.
    configs = Configs()
    plan = build_plan(
        load_story(write(tmp_path, "split.yaml", story("split", frames=11)), configs),
        configs,
    )
    references = {i for c in plan.calls if c.phase == "write" for i in c.frames}
    chunks = [
        {i for c in chunk.calls for i in c.frames} for chunk in story_chunks(plan, plan.calls, 2)
    ]
    for count in range(1, 5):
        shares = [frames_of_shard(plan, 2, Shard(i, count)) for i in range(count)]
        assert sorted(i for share in shares for i in share) == list(range(11))
        assert references <= shares[0]  # the leader writes the reference frames
        for share in shares:
            assert all(chunk <= share or not chunk & share for chunk in chunks)


def test_shards_split_a_batch_and_restart_skips_finished_work(tmp_path: Path) -> None:
    stories = tmp_path / "stories"
    for name in ("a", "b", "c"):
        write(stories, f"{name}.yaml", story(name, frames=2))
    out = tmp_path / "out"
    seen = []
    for index in range(2):
        result = run_cli("generate", stories, "--out", out, "--shard", f"{index}/2", "--json")
        seen += [r["name"] for r in json_lines(result.stdout)]
    assert sorted(seen) == ["a", "b", "c"] and len(seen) == 3  # each story exactly once
    assert all((out / name / "grid.png").is_file() for name in "abc")
    # A restarted shard gets the same stories and finds them done.
    result = run_cli("generate", stories, "--out", out, "--shard", "0/2", "--json")
    records = json_lines(result.stdout)
    assert [r["name"] for r in records] == ["a", "c"]
    assert all(f["status"] == "skipped" for r in records for f in r["frames"])


def torchrun(tmp_path: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    command = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--no-python"]
    proc = subprocess.run(
        [*command, *map(str, args)],
        env=env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_torchrun_two_processes_split_stories_and_one_story(tmp_path: Path) -> None:
    stories = tmp_path / "stories"
    write(stories, "a.yaml", story("alpha", frames=3))
    write(stories, "b.yaml", story("beta", frames=3, seed=9))
    # One process renders everything: the reference.
    run_cli("generate", stories, "--out", tmp_path / "one")

    proc = torchrun(tmp_path, BIN / "storydiff", "generate", stories, "--out", "two", "--json")
    records = json_lines(proc.stdout)
    assert sorted(r["name"] for r in records) == ["alpha", "beta"]
    assert {r["shard"]["index"] for r in records} == {0}  # each story whole, not shared
    for name in ("alpha", "beta"):
        expected, got = pixels(tmp_path / "one" / name), pixels(tmp_path / "two" / name)
        assert expected.keys() == got.keys() and len(got) == 3
        assert all(np.array_equal(expected[k], got[k]) for k in expected)

    # One long story: its frames are shared over both processes, pixels as one process makes.
    long = write(tmp_path / "long", "long.yaml", story("long", frames=9, noise="per-frame"))
    run_cli("generate", long, "--out", tmp_path / "one")
    proc = torchrun(tmp_path, BIN / "storydiff", "generate", long, "--out", "split", "--json")
    records = json_lines(proc.stdout)
    made = [
        {f["frame"] for f in r["frames"] if f["status"] == "generated"}
        for r in sorted(records, key=lambda r: r["shard"]["index"])
    ]
    assert [r["shard"]["count"] for r in records] == [2, 2]
    assert made[0] and made[1] and not made[0] & made[1]
    assert made[0] | made[1] == set(range(1, 10))
    assert sum(r["grid"] is not None for r in records) >= 1  # the last one finished the story
    expected, got = pixels(tmp_path / "one" / "long"), pixels(tmp_path / "split" / "long")
    assert expected.keys() == got.keys()
    assert all(np.array_equal(expected[k], got[k]) for k in expected)
    manifest = json.loads((tmp_path / "split" / "long" / "manifest.json").read_text())
    assert manifest["complete"] is True and len(manifest["frames"]) == 9
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "one" / "long" / "grid.png")),
        np.asarray(Image.open(tmp_path / "split" / "long" / "grid.png")),
    )


# ------------------------------------------------------------------------------ animate batch


def test_animate_a_folder_of_runs_loads_the_decoder_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stories = tmp_path / "stories"
    write(stories, "a.yaml", story("alpha", frames=2, consistency={"method": "none"}))
    write(stories, "b.yaml", story("beta", frames=2, consistency={"method": "none"}))
    out = tmp_path / "out"
    run_cli("generate", stories, "--out", out)
    (out / "zeta").mkdir()
    (out / "zeta" / "manifest.json").write_text("not json")  # a broken run folder
    loads = []
    real = storycli.motion.decoders.registry.load_decoder

    def counted(name: str, *args: Any, **kwargs: Any) -> Any:
        loads.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(storycli.motion.decoders.registry, "load_decoder", counted)
    result = run_cli("animate", out, "--frames", "3", "--json", code=EXIT_SOME_FAILED)
    records = json_lines(result.stdout)
    assert [(Path(r["input"]).name, r["status"]) for r in records] == [
        ("alpha", "done"),
        ("beta", "done"),
        ("zeta", "invalid"),
    ]
    assert loads == ["crossfade"]
    assert all((out / name / "video" / "story.mp4").is_file() for name in ("alpha", "beta"))

    # Several folders with --out: a root, one folder each.
    run_cli("animate", out / "alpha", out / "beta", "--frames", "3", "--out", tmp_path / "v")
    assert all((tmp_path / "v" / name / "story.mp4").is_file() for name in ("alpha", "beta"))


def test_animate_refuses_a_story_generate_has_not_finished(tmp_path: Path) -> None:
    run_cli("generate", write(tmp_path, "a.yaml", story("alpha", frames=2)), "--out", tmp_path)
    manifest = tmp_path / "alpha" / "manifest.json"
    manifest.write_text(json.dumps(json.loads(manifest.read_text()) | {"complete": False}))
    result = run_cli("animate", tmp_path / "alpha", code=EXIT_INVALID)
    assert "has not finished" in result.stderr
    assert not (tmp_path / "alpha" / "video").exists()


# ----------------------------------------------------------------------------------- scripts


def test_scripts_pass_shellcheck(shellcheck: str) -> None:
    scripts = sorted([*SCRIPTS.glob("*.sh"), *SCRIPTS.glob("*.sbatch")])
    assert {p.name for p in scripts} >= {
        "render-stories.sh",
        "render-torchrun.sh",
        "render-slurm.sbatch",
    }
    proc = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_batch_scripts_render_and_resume(tmp_path: Path) -> None:
    stories = tmp_path / "stories"
    write(stories, "a.yaml", story("alpha", frames=3))
    write(stories, "b.yaml", story("beta", frames=3))
    write(stories, "c.yaml", story("gamma", frames=3))

    def script(*args: str | Path, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", *map(str, args)],
            env=env(tmp_path, **extra),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )

    # Under torchrun: two processes, each its share of the stories, keyframes then videos.
    proc = script(SCRIPTS / "render-torchrun.sh", "2", stories, "out", "--model", "tiny")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("alpha", "beta", "gamma"):
        assert (tmp_path / "out" / name / "video" / "story.mp4").is_file()
    assert {p.name for p in (tmp_path / "out" / "logs").glob("*.log")} == {
        "a.log",
        "b.log",
        "c.log",
    }

    # A SLURM array task (sbatch's directives are comments to bash): task 1 of 2 renders
    # beta; a rerun picks up where it stopped and redoes nothing.
    slurm = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"}
    args = (SCRIPTS / "render-slurm.sbatch", stories, "slurm")
    proc = script(*args, SLURM_SUBMIT_DIR=str(REPO), **slurm)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in (tmp_path / "slurm").iterdir()) == ["beta", "logs"]
    story_video = tmp_path / "slurm" / "beta" / "video" / "story.mp4"
    written = story_video.stat().st_mtime_ns
    proc = script(*args, SLURM_SUBMIT_DIR=str(REPO), **slurm)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert story_video.stat().st_mtime_ns == written
    records = json_lines((tmp_path / "slurm" / "logs" / "generate-1.jsonl").read_text())
    assert all(f["status"] == "skipped" for r in records for f in r["frames"])

    # A broken story: the others are rendered, the script exits 3 (some failed).
    write(stories, "d.yaml", story("delta", steps=0))
    proc = script(SCRIPTS / "render-stories.sh", stories, "plain", "--model", "tiny")
    assert proc.returncode == 3, proc.stdout + proc.stderr
