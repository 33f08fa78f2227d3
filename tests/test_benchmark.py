"""The CSA benchmark script (benchmarks/csa.py) runs end to end on the tiny UNet."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "csa.py"
MODES = ["stock", "stock-single", "csa", "csa-bank-cpu", "csa-reference", "csa-window"]
FIELDS = {
    "device_name",
    "device",
    "torch",
    "diffusers",
    "date",
    "mode",
    "status",
    "frames",
    "id_length",
    "resolution",
    "dtype",
    "repeats",
    "notes",
}
MEASURED = {
    "seconds_per_image_step",
    "seconds_per_forward",
    "peak_bytes",
    "bank_bytes_per_step",
    "projected_bank_bytes",
    "projected_peak_bytes",
}


def run(out: Path, *extra: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (json_path,) = out.glob("cpu-quick-*.json")
    return json.loads(json_path.read_text())


def test_quick_benchmark_writes_json_markdown_and_plot(tmp_path):
    payload = run(tmp_path)
    records = payload["records"]

    stem = next(tmp_path.glob("cpu-quick-*.json")).stem
    markdown = (tmp_path / f"{stem}.md").read_text()
    assert "| mode | frames | s / image-step |" in markdown
    assert "## Targets" in markdown
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / f"{stem}.png").stat().st_size > 0

    # One record per (mode, frames) requested; the --quick defaults are 64 px, frames 4 and 8.
    assert sorted((r["mode"], r["frames"]) for r in records) == sorted(
        (m, f) for m in MODES for f in (4, 8)
    )
    assert {r["resolution"] for r in records} == {64}
    for rec in records:
        assert not FIELDS - rec.keys(), FIELDS - rec.keys()
        assert rec["device"] == "cpu" and rec["id_length"] == 4
        if rec["status"] == "skipped":
            assert rec["notes"]
            continue
        assert rec["status"] == "ok"
        assert not MEASURED - rec.keys(), MEASURED - rec.keys()
        assert rec["seconds_per_image_step"] > 0
        assert all(s > 0 for s in rec["seconds_per_forward"].values())
        assert rec["peak_bytes"] > 0
        if rec["mode"] in ("csa", "csa-bank-cpu", "csa-reference"):
            assert rec["bank_bytes_per_step"] > 0
            assert rec["projected_bank_bytes"] >= rec["bank_bytes_per_step"]
        else:  # stock, and window mode (which keeps no bank)
            assert rec["bank_bytes_per_step"] == 0

    # The stock and CSA modes must actually have run.
    ran = {r["mode"] for r in records if r["status"] == "ok"}
    assert {"stock", "stock-single", "csa"} <= ran

    # Story composition: F frames = one batch of R + (F - R) single frames.
    csa8 = next(r for r in records if r["mode"] == "csa" and r["frames"] == 8)
    assert csa8["forward_count"] == {"write": 1, "read": 4}
    assert csa8["forward_batch"] == {"write": 8, "read": 2}
    per_forward = csa8["seconds_per_forward"]
    assert csa8["seconds_per_image_step"] == pytest.approx(
        (per_forward["write"] + 4 * per_forward["read"]) / 8
    )
    # Window mode (window 4, stride 2): 8 frames are the windows starting at 0, 2 and 4.
    window8 = next(r for r in records if r["mode"] == "csa-window" and r["frames"] == 8)
    if window8["status"] == "ok":
        assert window8["forward_count"] == {"window": 3}
        assert window8["forward_batch"] == {"window": 8}
        assert window8["projected_peak_bytes"] > window8["peak_bytes"]


def test_isolated_worker_process(tmp_path):
    """The default for real runs: each mode measured in its own process."""
    payload = run(
        tmp_path,
        *("--isolate", "process", "--modes", "csa", "--frames", "4"),
        *("--repeats", "1", "--warmup", "0"),
    )
    (rec,) = payload["records"]
    assert rec["mode"] == "csa" and rec["status"] == "ok"
    assert rec["peak_bytes"] > 0 and rec["seconds_per_image_step"] > 0
    assert payload["meta"]["isolation"] == "process"


def test_merge_replaces_remeasured_modes():
    spec = importlib.util.spec_from_file_location("bench_csa", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_csa"] = bench  # dataclasses look their module up there
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules["bench_csa"]

    def payload(command, modes, skipped):
        records = [
            {"mode": m, "resolution": 512, "frames": f, "status": "ok", "run": command}
            for m in modes
            for f in (4, 8)
        ]
        meta = {
            "command": command,
            "wall_seconds": 10.0,
            "modes": dict.fromkeys(modes, "d"),
            "skipped": skipped,
            "workers": [{"group": command}],
            "composition": command,
        }
        return {"meta": meta, "records": records}

    old = payload("first", ["stock", "csa", "csa-window"], {"csa-window": "not there"})
    new = payload("second", ["csa-window"], {})
    merged = bench.merge(old, new)
    assert [(r["mode"], r["frames"], r["run"]) for r in merged["records"]] == [
        ("stock", 4, "first"),
        ("stock", 8, "first"),
        ("csa", 4, "first"),
        ("csa", 8, "first"),
        ("csa-window", 4, "second"),
        ("csa-window", 8, "second"),
    ]
    assert merged["meta"]["skipped"] == {}
    assert merged["meta"]["wall_seconds"] == 20.0
    assert merged["meta"]["command"] == "first && second"
    assert merged["meta"]["composition"] == "second"
