"""benchmarks/csa_dit.py (issue 22's FLUX.1 DiT benchmark) end to end on the tiny FLUX, and its
real-size FLUX.1 config on the meta device (shapes only: no memory, no GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_scripts import BENCHMARKS, load_script, run_tiny

SCRIPT = BENCHMARKS / "csa_dit.py"
META_FIELDS = {"device", "device_name", "torch", "diffusers", "transformers", "python", "date"}


def load_module():
    return load_script(SCRIPT, "bench_csa_dit")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("csa-dit")
    proc = run_tiny(SCRIPT, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (json_path,) = out.glob("csa-dit-cpu-tiny-*.json")
    return json.loads(json_path.read_text()), json_path.with_suffix(".md").read_text()


def test_tiny_run_times_csa_against_stock_per_forward(tiny_run: tuple[dict, str]) -> None:
    payload, _ = tiny_run
    meta = payload["meta"]
    assert not META_FIELDS - meta.keys()
    assert meta["tiny"] is True and meta["device"] == "cpu" and meta["size"] == 64
    assert meta["wall_seconds"] > 0
    build = meta["build"]
    assert build["transformer_parameters"] > 0 and build["transformer_build_seconds"] > 0

    forward = payload["forward"]
    assert forward["image_tokens"] == 16 * 16  # 64 px, tiny VAE ×2, 2×2 patches
    assert forward["csa_layers"] >= 1 and forward["bank_bytes_per_step"] > 0
    kinds = {f["kind"]: f for f in forward["forwards"]}
    assert set(kinds) == {"write", "read-1", "read-4"}
    assert [kinds[k]["rows"] for k in ("write", "read-1", "read-4")] == [2, 1, 4]
    for f in kinds.values():
        assert f["stock_seconds"] > 0 and f["csa_seconds"] > 0 and f["ratio"] > 0
        assert len(f["pair_ratios"]) == meta["repeats"] == 2
        assert f["ratio"] == pytest.approx(sum(f["pair_ratios"]) / 2)  # median of two
        # Warm-up rounds are kept in the raw samples, not in the medians.
        assert [len(v) for v in f["raw_seconds"].values()] == [3, 3]
    # 6 frames, R = 2: one write and the 4 reads in one forward of 4 (or four of 1).
    story = {(s["frames"], s["micro_batch"]): s for s in forward["stories"]}
    assert story[(6, 4)]["forwards"] == ["write", "read-4"]
    assert story[(6, 1)]["forwards"] == ["write"] + ["read-1"] * 4
    write, read4 = kinds["write"], kinds["read-4"]
    assert story[(6, 4)]["csa_seconds_per_image"] == pytest.approx(
        (write["csa_seconds"] + read4["csa_seconds"]) / 6
    )


def test_tiny_run_measures_whole_story_peaks(tiny_run: tuple[dict, str]) -> None:
    payload, _ = tiny_run
    story = payload["story"]
    assert story["peak_metric"] == "rss_vmhwm"
    runs = {(r["method"], r["frames"]): r for r in story["runs"]}
    assert set(runs) == {(m, f) for m in ("none", "storydiffusion") for f in (3, 6)}
    for (method, _frames), r in runs.items():
        assert r["peak_bytes"] > 0 and r["peak_bytes"] >= r["denoise_peak_bytes"] > 0
        assert len(r["steps_trace"]) == r["steps"] == 2
        assert (r["peak_bank_bytes"] > 0) == (method == "storydiffusion")
        assert r["t5_device_after"] == "cpu"
    summary = story["summary"]
    assert {p["frames"] for p in summary["pairs"]} == {3, 6}
    assert all(p["peak_ratio"] > 0 and p["time_ratio"] > 0 for p in summary["pairs"])
    growth = summary["growth"]["storydiffusion"]
    assert growth["frames"] == [3, 6]
    assert growth["ratio"] == pytest.approx(
        runs[("storydiffusion", 6)]["peak_bytes"] / runs[("storydiffusion", 3)]["peak_bytes"]
    )
    weights = payload["meta"]["build"]["transformer_weight_bytes"]
    assert summary["peak_limit_bytes"] == weights + 4 * 2**30
    assert summary["csa_longest_frames"] == 6


def test_tiny_run_reruns_the_stories_on_a_q8_gguf_transformer(tiny_run: tuple[dict, str]) -> None:
    payload, markdown = tiny_run
    gguf = payload["gguf"]
    built = gguf["build"]
    assert gguf["bf16_transformer_freed"] is True  # nothing kept the float transformer alive
    # The random file went through storycli's loader: quantized layers, fewer bytes than float32.
    assert built["tensors"]["Q8_0"] > 0 and built["gguf_linears"] > 0
    assert (
        0 < built["transformer_weight_bytes"] < payload["meta"]["build"]["transformer_weight_bytes"]
    )
    assert built["file_bytes"] > 0 and built["load_seconds"] > 0
    runs = {(r["method"], r["frames"]): r for r in gguf["runs"]}
    assert set(runs) == {(m, f) for m in ("none", "storydiffusion") for f in (3, 6)}
    assert all(r["peak_bytes"] > 0 and len(r["steps_trace"]) == 2 for r in runs.values())
    assert runs[("storydiffusion", 6)]["peak_bank_bytes"] > 0
    assert gguf["summary"]["csa_longest_frames"] == 6
    assert "## Q8_0 GGUF transformer" in markdown
    # Then the way `--offload model` places the pipeline (storycli's place_pipeline).
    offload = gguf["offload_model"]
    assert offload["method"] == "storydiffusion" and offload["frames"] == 6
    assert offload["peak_bytes"] > 0 and offload["peak_bank_bytes"] > 0
    assert "| Q8_0 GGUF with --offload model: CSA story peak, 6 frames ≤ 16 GB |" in markdown
    assert "| Q8_0 GGUF: CSA story peak, 6 frames ≤ 17 GiB |" in markdown


def test_tiny_run_writes_markdown_without_gpu_verdicts(tiny_run: tuple[dict, str]) -> None:
    _, markdown = tiny_run
    assert "## Per forward" in markdown and "## Whole stories" in markdown
    assert "## Targets (issue 22)" in markdown
    assert "✅" not in markdown and "❌" not in markdown  # never a verdict from a CPU
    assert "not a GPU number" in markdown


def test_real_flux_config_on_the_meta_device() -> None:
    """FLUX.1-dev's transformer as the GPU run builds it: 11.9 B parameters, 22.2 GiB in
    bfloat16, the default CSA blocks its last 19 single-stream blocks."""
    import torch

    from storycli.consistency.csa_dit import dit_csa_layers

    bench = load_module()
    transformer = bench.build_transformer(torch.device("meta"), torch.bfloat16, 0)
    assert torch.get_default_dtype() == torch.float32  # restored
    parameters = list(transformer.parameters())
    assert all(p.dtype == torch.bfloat16 and p.device.type == "meta" for p in parameters)
    assert sum(p.numel() for p in parameters) == 11_901_408_320
    assert len(transformer.transformer_blocks) == 19
    assert len(transformer.single_transformer_blocks) == 38
    assert len(dit_csa_layers(transformer, ["up"])) == 19


def test_read_chunks_and_composition() -> None:
    bench = load_module()
    assert bench.read_chunks(4, 4) == [4]
    assert bench.read_chunks(5, 4) == [4, 1]
    assert bench.read_chunks(0, 4) == []
    args = bench.parse_args(["--tiny", "--frames", "3", "7", "--micro-batches", "4"])
    forwards = [
        {"kind": "write", "stock_seconds": 2.0, "csa_seconds": 2.2},
        {"kind": "read-4", "stock_seconds": 4.0, "csa_seconds": 4.4},
    ]
    # 3 frames need a read of 1 (not measured): left out; 7 frames: write + read-4 + read-1,
    # read-1 not measured either.
    assert bench.compose(forwards, args) == []
    args = bench.parse_args(["--tiny", "--frames", "6", "--micro-batches", "4"])
    (story,) = bench.compose(forwards, args)
    assert story["ratio"] == pytest.approx(1.1)
    assert story["stock_seconds_per_image"] == pytest.approx(1.0)


def test_gpu_check_reads_dit_targets_from_a_made_up_gpu_run() -> None:
    gc = load_script(BENCHMARKS / "gpu_scripts.py", "gpu_scripts_dit")
    gib = 2**30
    results = {
        "meta": {"size": 1024},
        "forward": {
            "stories": [
                {"frames": 6, "micro_batch": 1, "ratio": 1.05},
                {"frames": 6, "micro_batch": 4, "ratio": 1.2},
                {"frames": 3, "micro_batch": 4, "ratio": 1.0},
            ]
        },
        "story": {
            "summary": {
                "csa_longest_peak_bytes": 25 * gib,
                "csa_longest_frames": 6,
                "peak_limit_bytes": 26 * gib,
                "growth": {"storydiffusion": {"frames": [3, 6], "ratio": 1.02}},
            }
        },
    }
    results["gguf"] = {
        "summary": {"csa_longest_peak_bytes": 16.5 * gib, "csa_longest_frames": 6},
        "offload_model": {"frames": 6, "peak_bytes": 15.5e9},
    }
    dit = {"status": "ok", "results": results}
    rows = gc.dit_targets(dit, {"tiny": False, "device": "cuda"})
    met = {t["target"]: (t["measured"], t["met"]) for t in rows}
    assert met["FLUX.1 DiT, 1024²: Q8_0 GGUF transformer, CSA story peak"] == (16.5, True)
    offload = "FLUX.1 DiT, 1024²: Q8_0 GGUF with --offload model, CSA story peak"
    assert met[offload] == (round(15.5e9 / gib, 3), True)  # 15.5 GB ≤ 16 GB
    # Judged at the story loop's GPU micro-batch (4), not the best one.
    assert met["FLUX.1 DiT, 1024²: CSA / stock time per image"] == (1.2, False)
    assert met["FLUX.1 DiT, 1024²: CSA story peak ≤ transformer weights + 4 GiB"] == (25.0, True)
    flat = "FLUX.1 DiT, 1024²: CSA story peak flat in frames (longest / shortest)"
    assert met[flat] == (1.02, False)
    # Not run: rows without numbers or verdicts; a CPU run: numbers without verdicts.
    empty = gc.dit_targets({"status": "not run", "note": "budget spent"}, {"device": "cuda"})
    assert all(t["measured"] is None and t["met"] is None for t in empty)
    cpu = gc.dit_targets(dit, {"tiny": True, "device": "cpu"})
    assert all(t["met"] is None for t in cpu)


def test_real_path_at_a_small_width(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU run's code (the transformer and pipeline built here, T5 hidden 4096 at 512
    tokens, CLIP pooled 768, FLUX's 8× VAE) on the CPU with narrow blocks: the path --tiny
    does not take."""
    bench = load_module()
    monkeypatch.setattr(
        bench,
        "FLUX_DEV_TRANSFORMER",
        bench.FLUX_DEV_TRANSFORMER
        | {
            "num_layers": 1,
            "num_single_layers": 2,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "axes_dims_rope": (4, 6, 6),
        },
    )
    monkeypatch.setattr(
        bench, "FLUX_VAE", bench.FLUX_VAE | {"block_out_channels": [8] * 4, "norm_num_groups": 4}
    )
    monkeypatch.setattr(bench, "TEXT_LAYERS", 1)
    argv = ["--device", "cpu", "--dtype", "float32", "--size", "64", "--out", str(tmp_path)]
    argv += ["--repeats", "1", "--warmup", "0", "--steps", "1", "--threads", "1"]
    assert bench.main(argv) == 0
    (json_path,) = tmp_path.glob("csa-dit-cpu-*.json")
    payload = json.loads(json_path.read_text())
    assert payload["meta"]["tiny"] is False
    forward = payload["forward"]
    assert forward["image_tokens"] == 4 * 4 and forward["text_tokens"] == 512
    assert all(f["ratio"] > 0 for f in forward["forwards"])
    assert payload["meta"]["build"]["pipeline_rest_seconds"] > 0
    runs = payload["story"]["runs"]
    assert len(runs) == 4 and all(r["peak_bytes"] > 0 for r in runs)
    # The GGUF part at this width: every linear layer whose rows are whole blocks is Q8_0.
    assert payload["gguf"]["build"]["gguf_linears"] > 0 and len(payload["gguf"]["runs"]) == 4
