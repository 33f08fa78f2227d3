"""The benchmark scripts (benchmarks/csa.py, benchmarks/story_loop.py) run end to end on the
tiny models."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPT = BENCHMARKS / "csa.py"
STORY_SCRIPT = BENCHMARKS / "story_loop.py"
FORWARD_FIELDS = {
    "mode",
    "kind",
    "batch",
    "resolution",
    "stock_seconds",
    "csa_seconds",
    "ratio",
    "ratio_of_medians",
    "pair_ratios",
    "raw_seconds",
    "bank_bytes_per_step",
}
META_FIELDS = {"device_name", "device", "torch", "diffusers", "date", "dtype", "command"}


def load(script: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def run(script: Path, out: Path, pattern: str, *extra: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (json_path,) = out.glob(pattern)
    return json.loads(json_path.read_text())


def test_quick_benchmark_writes_json_markdown_and_plot(tmp_path):
    payload = run(SCRIPT, tmp_path, "cpu-quick-*.json", "--warmup", "0")
    meta, forwards, stories = payload["meta"], payload["forwards"], payload["stories"]
    assert not META_FIELDS - meta.keys()
    assert meta["device"] == "cpu" and meta["id_length"] == 4
    assert meta["micro_batches"] == [1, 2, 4]

    stem = next(tmp_path.glob("cpu-quick-*.json")).stem
    markdown = (tmp_path / f"{stem}.md").read_text()
    assert "| mode | forward | batch | stock s | CSA s |" in markdown
    assert "## Targets" in markdown
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / f"{stem}.png").stat().st_size > 0

    # Every forward kind, stock and CSA timed in alternating pairs, every round kept.
    kinds = {(f["mode"], f["kind"]): f for f in forwards}
    assert set(kinds) == {
        ("csa", "write"),
        ("csa", "read-1"),
        ("csa", "read-2"),
        ("csa", "read-4"),
        ("csa-reference", "write"),
        ("csa-window", "window"),
    }
    for f in forwards:
        assert not FORWARD_FIELDS - f.keys(), FORWARD_FIELDS - f.keys()
        assert f["resolution"] == 64
        assert f["stock_seconds"] > 0 and f["csa_seconds"] > 0
        assert len(f["pair_ratios"]) == 2  # --quick: 2 timed rounds
        assert f["ratio"] == pytest.approx(sum(f["pair_ratios"]) / 2)  # median of two
        assert [len(v) for v in f["raw_seconds"].values()] == [2, 2]
    # A read micro-batch of m one-frame calls is one forward of batch 2m (CFG).
    assert [kinds[("csa", f"read-{m}")]["batch"] for m in (1, 2, 4)] == [2, 4, 8]
    assert kinds[("csa", "write")]["batch"] == 8
    assert kinds[("csa", "write")]["bank_bytes_per_step"] > 0
    assert kinds[("csa-window", "window")]["bank_bytes_per_step"] == 0

    # Story composition: F frames = one write of R + (F - R) reads in micro-batches of m.
    by = {(s["mode"], s["frames"], s["micro_batch"]): s for s in stories}
    write, read2 = kinds[("csa", "write")], kinds[("csa", "read-2")]
    story = by[("csa", 8, 2)]
    assert story["forward_count"] == {"write": 1, "read-2": 2}
    assert story["csa_seconds_per_image_step"] == pytest.approx(
        (write["csa_seconds"] + 2 * read2["csa_seconds"]) / 8
    )
    assert story["ratio"] == pytest.approx(
        story["csa_seconds_per_image_step"] / story["stock_seconds_per_image_step"]
    )
    assert by[("csa", 8, 4)]["forward_count"] == {"write": 1, "read-4": 1}
    assert ("csa", 4, 1) in by and ("csa", 4, 2) not in by  # references only: no reads
    # Window mode (window 4, stride 2): 8 frames are the windows starting at 0, 2 and 4.
    assert by[("csa-window", 8, None)]["forward_count"] == {"window": 3}
    assert not any(s["mode"] == "csa-reference" for s in stories)  # write only


def test_removed_mode_is_recorded_as_skipped(tmp_path):
    payload = run(
        SCRIPT,
        tmp_path,
        "cpu-quick-*.json",
        *("--modes", "csa", "csa-bank-cpu", "--micro-batches", "1"),
        *("--frames", "5", "--repeats", "1", "--warmup", "0", "--isolate", "process"),
    )
    assert "placement" in payload["meta"]["skipped"]["csa-bank-cpu"]
    assert payload["meta"]["isolation"] == "process"
    assert {(f["mode"], f["kind"]) for f in payload["forwards"]} == {
        ("csa", "write"),
        ("csa", "read-1"),
    }
    (story,) = payload["stories"]
    assert story["forward_count"] == {"write": 1, "read-1": 1}


def test_read_chunks_match_the_story_loop():
    bench = load(SCRIPT, "bench_csa")
    assert bench.read_chunks(4, 4) == [4]
    assert bench.read_chunks(6, 4) == [4, 2]
    assert bench.read_chunks(96, 1) == [1] * 96
    assert bench.read_chunks(0, 2) == []


def test_merge_replaces_remeasured_modes():
    bench = load(SCRIPT, "bench_csa")

    def payload(command, modes, skipped):
        forwards = [{"mode": m, "resolution": 512, "kind": "write", "run": command} for m in modes]
        stories = [
            {"mode": m, "resolution": 512, "frames": f, "micro_batch": 1, "run": command}
            for m in modes
            for f in (4, 8)
        ]
        meta = {
            "command": command,
            "wall_seconds": 10.0,
            "modes": dict.fromkeys(modes, "d"),
            "skipped": skipped,
            "workers": [{"run": command}],
            "composition": command,
        }
        return {"meta": meta, "forwards": forwards, "stories": stories}

    old = payload("first", ["csa", "csa-window"], {"csa-bank-cpu": "removed"})
    new = payload("second", ["csa-window"], {})
    merged = bench.merge(old, new)
    assert [(r["mode"], r["run"]) for r in merged["forwards"]] == [
        ("csa", "first"),
        ("csa-window", "second"),
    ]
    assert [(r["mode"], r["frames"], r["run"]) for r in merged["stories"]] == [
        ("csa", 4, "first"),
        ("csa", 8, "first"),
        ("csa-window", 4, "second"),
        ("csa-window", 8, "second"),
    ]
    assert merged["meta"]["skipped"] == {"csa-bank-cpu": "removed"}
    assert merged["meta"]["wall_seconds"] == 20.0
    assert merged["meta"]["command"] == "first && second"


def test_quick_story_loop_memory_benchmark(tmp_path):
    payload = run(STORY_SCRIPT, tmp_path, "story-cpu-quick-*.json")
    meta, runs, summary = payload["meta"], payload["runs"], payload["summary"]
    assert not META_FIELDS - meta.keys()
    assert meta["peak_metric"] == "rss_vmhwm" and meta["size"] == 64
    # --quick: steps 1 and 2 at 3 frames, frames 3 and 4 at 1 step; stock and CSA each.
    assert sorted((r["method"], r["frames"], r["steps"]) for r in runs) == sorted(
        (m, f, s) for m in ("none", "storydiffusion") for f, s in ((3, 1), (3, 2), (4, 1))
    )
    for r in runs:
        assert r["peak_bytes"] >= r["baseline_bytes"] > 0
        assert r["peak_resettable"]
        assert len(r["steps_trace"]) == r["steps"]
        assert r["story_loop"]["frame_batch"] == 2  # the CPU default
        # One write (or plain) call of the 2 references, then one call per other frame.
        assert r["calls"][0] == ["write" if r["method"] != "none" else "plain", [0, 1]]
        bank = r["story_loop"]["peak_bank_bytes"]
        assert (bank > 0) == (r["method"] == "storydiffusion")

    stories = {(s["frames"], s["steps"]): s for s in summary["stories"]}
    assert set(stories) == {(3, 1), (3, 2), (4, 1)}
    for s in stories.values():
        assert s["peak_ratio"] == pytest.approx(s["csa_peak_bytes"] / s["stock_peak_bytes"])
        assert s["peak_ratio"] > 0 and s["time_ratio"] > 0
    # The bank holds one step: its peak does not grow with the story's steps.
    assert stories[(3, 2)]["peak_bank_bytes"] == stories[(3, 1)]["peak_bank_bytes"]
    for method in ("none", "storydiffusion"):
        for axis, xs in (("steps", [1, 2]), ("frames", [3, 4])):
            growth = summary["growth"][method][axis]
            assert [x for x, _ in growth["points"]] == xs
            assert growth["ratio"] == pytest.approx(growth["points"][1][1] / growth["points"][0][1])

    markdown = next(tmp_path.glob("story-cpu-quick-*.md")).read_text()
    assert "| frames | steps | stock story peak GiB | CSA story peak GiB | × stock" in markdown
    assert "no growth with steps" in markdown and "no growth with frames" in markdown
