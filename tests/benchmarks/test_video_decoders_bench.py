"""benchmarks/video_decoders.py (Wan2.1 FLF2V and LTX-Video decoders) end to end on the tiny
pipelines, its real-size configs on the meta device (shapes only: no memory, no GPU), and the
real-size code path at a narrow width on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_scripts import BENCHMARKS, load_script, run_tiny

SCRIPT = BENCHMARKS / "video_decoders.py"
META_FIELDS = {"device", "device_name", "torch", "diffusers", "transformers", "date", "command"}


def load_module():
    return load_script(SCRIPT, "bench_video_decoders")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("video-decoders")
    proc = run_tiny(SCRIPT, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (json_path,) = out.glob("video-decoders-cpu-tiny-*.json")
    return json.loads(json_path.read_text()), json_path.with_suffix(".md").read_text()


def test_tiny_run_measures_both_decoders(tiny_run: tuple[dict, str]) -> None:
    payload, _ = tiny_run
    meta = payload["meta"]
    assert not META_FIELDS - meta.keys()
    assert meta["tiny"] is True and meta["device"] == "cpu" and meta["budget_s"] == 300
    assert meta["wall_seconds"] > 0 and meta["steps"] == 2
    decoders = payload["decoders"]
    assert set(decoders) == {"wan", "ltx"}
    for name, record in decoders.items():
        build = record["build"]
        assert build["parameters"] > 0 and build["build_seconds"] > 0
        assert {"transformer", "vae", "text_encoder"} <= build["components"].keys()
        assert record["warmup"]["seconds"] > 0 and record["skipped"] == []
        runs = record["runs"]
        assert [[r["width"], r["height"], r["frames"]] for r in runs] == meta["sizes"][name]
        for r in runs:
            assert (r["render_width"], r["render_height"]) == (r["width"], r["height"])
            assert r["render_frames"] == r["frames"]  # the tiny sizes are 4k+1 / 8k+1 already
            assert r["latent_tokens"] > 0
            assert len(r["step_seconds"]) == r["steps"] == 2
            assert r["seconds_per_step"] > 0 and r["total_seconds"] > r["seconds_per_step"]
            assert r["rest_seconds"] == pytest.approx(
                r["total_seconds"] - 2 * r["seconds_per_step"]
            )
            # Extrapolated to the real preset's steps: wan 50, ltx 40.
            assert r["preset_steps"] == {"wan": 50, "ltx": 40}[name]
            assert r["extrapolated_seconds"] == pytest.approx(
                r["rest_seconds"] + r["preset_steps"] * r["seconds_per_step"]
            )
            assert r["peak_bytes"] > 0 and r["baseline_bytes"] > 0
            assert r["peak_metric"] == "rss_vmhwm"
    assert decoders["wan"]["offload"]["status"] == "skipped"  # needs an accelerator


def test_tiny_run_writes_markdown(tiny_run: tuple[dict, str]) -> None:
    _, markdown = tiny_run
    assert "## wan (wan-tiny" in markdown and "## ltx (ltx-tiny" in markdown
    assert "**Extrapolated**" in markdown and "| 48×32 | 9 (9) |" in markdown
    assert "Offload run skipped" in markdown


def test_real_configs_on_the_meta_device() -> None:
    """The GPU run's models, built on meta: Wan2.1-FLF2V-14B (16.4 B: 14 B and FLF2V's image
    cross-attention), CLIP ViT-H/14's tower, UMT5-/T5-XXL encoders, LTX-Video 0.9.5's 1.9 B."""
    import torch

    bench = load_module()
    sizes = bench.dry_build()
    assert torch.get_default_dtype() == torch.float32  # restored
    params = {(m, c): v["parameters"] for m, comps in sizes.items() for c, v in comps.items()}
    assert params[("wan", "transformer")] == 16_395_536_704
    assert params[("wan", "image_encoder")] == 630_766_080
    assert params[("wan", "vae")] == 126_892_531
    assert params[("ltx", "transformer")] == 1_923_385_472
    assert params[("ltx", "vae")] == 1_246_913_522
    # XXL encoders minus the 250k-word vocabulary (the offline tokenizer's is small).
    for model in ("wan", "ltx"):
        assert 4.6e9 < params[(model, "text_encoder")] < 4.65e9
        assert all(v["weight_bytes"] == 2 * v["parameters"] for v in sizes[model].values())


def test_prediction_and_budget_skip(tmp_path: Path) -> None:
    bench = load_module()
    assert bench.predicted_seconds([], 100) is None
    done = [{"total_seconds": 10.0, "latent_tokens": 100}]
    assert bench.predicted_seconds(done, 400) == pytest.approx(10.0 * 4**1.5)
    # No budget: nothing is built, both decoders say so, the files are still written.
    assert bench.main(["--tiny", "--budget-s", "0", "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("video-decoders-cpu-tiny-*.json")
    payload = json.loads(json_path.read_text())
    for record in payload["decoders"].values():
        assert record["skipped"][0]["reason"].startswith("budget: 0 s left")
        assert "runs" not in record and "build" not in record
    assert "## wan: not run" in json_path.with_suffix(".md").read_text()


def test_real_path_at_a_narrow_width(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU run's code (real builders, VAE tiling on, CLIP at 224² with 2 × 257 image
    positions, UMT5 at 512 tokens, T5 at 256) on the CPU with narrow layers: what --tiny skips."""
    bench = load_module()
    narrow_text = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 4}
    narrow_text |= {"relative_attention_num_buckets": 8}
    patches = {
        "WAN_TRANSFORMER": bench.WAN_TRANSFORMER
        | {"num_attention_heads": 2, "attention_head_dim": 12, "text_dim": 32, "freq_dim": 32}
        | {"ffn_dim": 64, "num_layers": 1, "image_dim": 32, "added_kv_proj_dim": 24}
        | {"rope_max_seq_len": 32},
        "WAN_VAE": {"base_dim": 8, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1},
        "UMT5_XXL": bench.UMT5_XXL | narrow_text,
        "T5_XXL": bench.T5_XXL | narrow_text,
        "CLIP_VIT_H": bench.CLIP_VIT_H
        | {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
        | {"num_attention_heads": 4, "projection_dim": 32},
        "LTX_TRANSFORMER": bench.LTX_TRANSFORMER
        | {"in_channels": 8, "out_channels": 8, "num_attention_heads": 2}
        | {"attention_head_dim": 16, "cross_attention_dim": 32, "num_layers": 1}
        | {"caption_channels": 32},
        "LTX_VAE": bench.LTX_VAE
        | {"latent_channels": 8, "block_out_channels": [4, 8, 16, 32, 32]}
        | {"decoder_block_out_channels": [8, 16, 32], "layers_per_block": [1] * 5}
        | {"decoder_layers_per_block": [1] * 4},
        "SIZES": {"wan": [(32, 32, 5), (48, 32, 7)], "ltx": [(64, 64, 9)]},
    }
    for name, value in patches.items():
        monkeypatch.setattr(bench, name, value)
    argv = ["--device", "cpu", "--dtype", "float32", "--threads", "1", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    (json_path,) = tmp_path.glob("video-decoders-cpu-*.json")
    payload = json.loads(json_path.read_text())
    meta = payload["meta"]
    assert meta["tiny"] is False and meta["text_encoder_layers"] == 1
    wan, ltx = payload["decoders"]["wan"], payload["decoders"]["ltx"]
    assert wan["build"]["vae_tiling"] and wan["build"]["preset"] == "wan"
    assert "image_encoder" in wan["build"]["components"]
    # 7 frames asked: Wan renders 9 (4k+1) and resamples.
    assert [(r["frames"], r["render_frames"]) for r in wan["runs"]] == [(5, 5), (7, 9)]
    assert [r["preset_steps"] for r in wan["runs"]] == [50, 50]
    assert len(ltx["runs"]) == 1 and ltx["runs"][0]["preset_steps"] == 40
