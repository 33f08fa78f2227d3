"""benchmarks/gpu_check.py (issue 19's GPU check) end to end on the tiny model, its summary
logic on made-up runs, the model folder it builds (at a small width), and its shell scripts."""

from __future__ import annotations

import json
import subprocess

import pytest
from bench_scripts import BENCHMARKS, load_script, run_tiny

SCRIPT = BENCHMARKS / "gpu_check.py"
SHELL_SCRIPTS = [BENCHMARKS / "gpu_check.sh", BENCHMARKS / "gpu_wheels.sh"]


def load_module():
    return load_script(SCRIPT, "gpu_check")


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("gpu-check")
    proc = run_tiny(SCRIPT, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (json_path,) = out.glob("gpu-check-tiny-*.json")
    (md_path,) = out.glob("gpu-check-tiny-*.md")
    return json.loads(json_path.read_text()), md_path.read_text()


def test_tiny_check_records_both_methods_and_ratios(tiny_check: tuple[dict, str]) -> None:
    results, _ = tiny_check
    meta = results["meta"]
    assert meta["tiny"] is True and meta["device"] == "cpu"
    for key in ("torch", "diffusers", "transformers", "python", "device_name", "date"):
        assert meta[key], key
    assert "--compile" in meta["generate_flags"] and "--overwrite" in meta["generate_flags"]

    runs = {r["id"]: r for r in results["runs"]}
    for side in ("stock", "csa"):
        run = runs[f"two_friends/{side}/eager"]
        assert run["status"] == "ok", run["stderr_tail"]
        manifest = run["manifest"]
        assert manifest["generated"] == manifest["frames"] == 9
        assert manifest["unet_forwards_per_step"] >= 1
        assert manifest["denoise_s"] > 0 and manifest["seconds"] > 0
        assert manifest["peak_memory_kind"] == "process_peak_rss"
        assert run["wall_s"] >= manifest["seconds"]
        assert "--overwrite" in run["args"] and "tiny" in run["args"]
    # Stock and CSA interleaved, in the order of importance; compile last and, tiny, skipped.
    order = [r["id"] for r in results["runs"]]
    assert order[:2] == ["two_friends/stock/eager", "two_friends/csa/eager"]
    assert all(runs[i]["status"] == "skipped" for i in order if i.endswith("/compile"))
    assert order.index("two_friends/csa/rerun") < order.index("lighthouse/stock/compile")

    pair = results["csa_over_stock"]["two_friends/eager"]
    assert pair["denoise"] > 0 and pair["wall"] > 0 and None not in pair["forwards_per_step"]

    rerun = runs["two_friends/csa/rerun"]
    assert rerun["status"] == "ok" and rerun["manifest"]["generated"] == 0
    assert "--overwrite" not in rerun["args"]

    # The fp16-safe VAE's run is the GPU's; here `validate` is asked about the `vae:` key.
    assert runs["two_friends/csa/fp16-vae"]["status"] == "skipped"
    assert isinstance(meta["vae_key"]["accepted"], bool) and meta["vae_key"]["validate"]

    targets = {t["target"]: t for t in results["targets"]}
    forwards = targets["UNet forwards per step, two_friends: CSA ≤ stock + 1"]
    assert forwards["met"] is not None and forwards["measured"] == pair["forwards_per_step"][1]
    assert targets["denoising time, two_friends: CSA / stock"]["measured"] == pair["denoise"]
    peak = targets["story peak, default VAE (largest of the eager runs)"]
    assert peak["met"] is None and "CPU RSS" in peak["detail"]  # no GPU number from a CPU

    # Issue 22's FLUX.1 DiT benchmark ran (tiny) before the fp16-VAE pair; no verdicts here.
    dit = results["dit"]
    assert dit["status"] == "ok" and dit["results"]["meta"]["tiny"] is True
    dit_rows = [t for t in results["targets"] if t["target"].startswith("FLUX.1 DiT")]
    assert len(dit_rows) == 5 and all(t["measured"] and t["met"] is None for t in dit_rows)

    # Issue 19's script targets: csa.py's --quick per forward, the ConsiStory+ protocol (tiny).
    assert results["forward"]["status"] == "ok" and results["consistory"]["status"] == "ok"
    per_forward = [t for t in results["targets"] if t["target"].startswith("SDXL per forward")]
    kinds = [t["target"].rsplit(", ", 1)[1] for t in per_forward]
    assert kinds == ["write", "read-1", "read-2", "read-4"]
    assert all(t["measured"] > 0 and t["met"] is None for t in per_forward)
    consistory = targets["ConsiStory+ protocol (tiny): CSA / stock seconds per image"]
    methods = results["consistory"]["results"]["methods"]
    expected = methods["storydiffusion"]["seconds_per_image"] / methods["none"]["seconds_per_image"]
    assert consistory["measured"] == round(expected, 3) and consistory["met"] is None


def test_tiny_check_writes_the_markdown_table(tiny_check: tuple[dict, str]) -> None:
    _, markdown = tiny_check
    assert "| target | limit | measured | met | detail |" in markdown
    assert "## Runs (in the order they ran)" in markdown
    assert "| two_friends/eager |" in markdown  # the CSA / stock table
    assert "tiny model, CPU" in markdown


def run(gpu_check, id_: str, status: str = "ok", wall: float = 10.0, **manifest):
    story, side, variant = id_.split("/")
    return gpu_check.Run(
        id_, story, side, variant, status=status, wall_s=wall, timeout_s=300.0, manifest=manifest
    )


def test_targets_on_made_up_gpu_runs() -> None:
    gc = load_module()
    cuda = {"peak_memory_kind": "cuda_max_allocated"}
    runs = [
        run(
            gc,
            "two_friends/stock/eager",
            wall=23.0,
            peak_gib=11.0,
            denoise_s=8.0,
            unet_forwards_per_step=3,
            **cuda,
        ),
        run(
            gc,
            "two_friends/csa/eager",
            wall=31.0,
            peak_gib=12.5,
            denoise_s=9.0,
            unet_forwards_per_step=4,
            **cuda,
        ),
        run(gc, "two_friends/csa/rerun", wall=2.5, generated=0),
        run(gc, "two_friends/stock/fp16-vae", peak_gib=8.0, **cuda),
        run(gc, "two_friends/csa/fp16-vae", status="skipped"),
        run(gc, "lighthouse/stock/eager", wall=33.0, steady_step_s=0.36),
        run(gc, "lighthouse/csa/eager", wall=31.0, steady_step_s=0.4),
        run(gc, "lighthouse/stock/compile", wall=30.0, steady_step_s=0.24),
        run(gc, "lighthouse/csa/compile", status="timed out", wall=120.0),
        run(gc, "two_friends/stock/compile", status="not run"),
    ]
    summary = gc.comparisons(runs)
    assert summary["csa_over_stock"]["two_friends/eager"]["denoise"] == 1.125
    assert summary["compile"]["lighthouse/stock"]["compile_s"] == -3.0
    assert summary["compile"]["lighthouse/stock"]["faster"] is True
    assert summary["compile"]["lighthouse/stock"]["steady_speedup"] == 1.5
    assert "two_friends/stock" not in summary["compile"]  # never started: no verdict

    met = {t["target"]: t["met"] for t in gc.targets(runs, summary)}
    assert met["story peak, default VAE (largest of the eager runs)"] is False  # 12.5 > 12
    assert met["story peak, fp16-safe VAE (largest of its runs)"] is True
    assert met["UNet forwards per step, two_friends: CSA ≤ stock + 1"] is True
    assert met["denoising time, two_friends: CSA / stock"] is True
    assert met["--compile wall (compiling included) < eager wall, lighthouse/stock"] is True
    assert met["--compile steady step, eager / compiled, lighthouse/stock"] is True  # 1.5 ≥ 1.2
    # Killed after 300 s against an eager 31 s: not faster; its steady step is unknown.
    assert met["--compile wall (compiling included) < eager wall, lighthouse/csa"] is False
    assert met["--compile steady step, eager / compiled, lighthouse/csa"] is None
    assert met["rerun with nothing to do, wall"] is True


def test_only_picks_groups_and_compile_brings_its_eager_baseline() -> None:
    gc = load_module()
    args = gc.parse_args(["--only", "compile", "forward"])
    assert args.groups == ("forward", "compile")  # the check's own order
    runs = {r.id: r for r in gc.plan_runs({"--compile"}, tiny=False, groups=args.groups)}
    picked = {i for i, r in runs.items() if r.status == "not run"}
    assert picked == {
        "lighthouse/stock/eager",
        "lighthouse/csa/eager",
        "lighthouse/stock/compile",
        "lighthouse/csa/compile",
    }
    assert runs["two_friends/csa/eager"].note == "not picked (--only)"
    assert gc.parse_args(["--no-dit"]).groups == tuple(g for g in gc.GROUPS if g != "dit")
    assert gc.parse_args([]).groups == gc.GROUPS and gc.parse_args([]).only is None


def test_steady_step_is_the_median_of_the_later_half(tmp_path) -> None:
    gc = load_module()
    steps = [9.0, 5.0, 0.5, 0.4, 0.3, 0.31, 0.29, 0.3]  # compiling, then steady
    manifest = {"seconds": 20.0, "frames": [], "story_loop": {"step_seconds": steps}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert gc.manifest_metrics(tmp_path)["steady_step_s"] == 0.3


def test_builds_and_saves_an_fp16_folder_diffusers_loads(tmp_path, monkeypatch) -> None:
    """The GPU build at a tiny width (same code, same tokenizers, CPU): `*.fp16.safetensors`
    only, CLIP's 49,408-token tokenizers, and the fp16-safe VAE copy."""
    gc = load_module()
    unet = json.loads(gc.UNET_CONFIG.read_text())
    unet |= {
        "block_out_channels": [32, 64, 64],
        "attention_head_dim": [2, 4, 4],
        "transformer_layers_per_block": [1, 1, 1],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "cross_attention_dim": 96,  # 32 + 64
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 6 * 8 + 64,
    }
    small_unet = tmp_path / "unet.json"
    small_unet.write_text(json.dumps(unet))
    monkeypatch.setattr(gc, "UNET_CONFIG", small_unet)
    monkeypatch.setattr(gc, "SDXL_VAE", gc.SDXL_VAE | {"block_out_channels": [32, 32, 32, 32]})
    small_text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    te1 = gc.SDXL_TEXT_ENCODER | small_text | {"num_attention_heads": 2, "projection_dim": 32}
    te2 = gc.SDXL_TEXT_ENCODER_2 | small_text | {"hidden_size": 64, "num_attention_heads": 2}
    monkeypatch.setattr(gc, "SDXL_TEXT_ENCODER", te1)
    monkeypatch.setattr(gc, "SDXL_TEXT_ENCODER_2", te2 | {"projection_dim": 64})

    folder = tmp_path / "model"
    info = gc.build_sdxl_folder(folder, "cpu")
    assert info["reused"] is False and info["parameters"]["unet"] > 0
    weights = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors"))
    assert weights and all(name.endswith(".fp16.safetensors") for name in weights)
    assert gc.build_sdxl_folder(folder, "cpu")["reused"] is True

    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, variant="fp16", dtype=torch.float32)
    assert len(pipe.tokenizer) == len(pipe.tokenizer_2) == 49408
    assert pipe.tokenizer_2.pad_token == "!" and pipe.unet.dtype == torch.float32
    ids = pipe.tokenizer("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's own ids

    vae = gc.fp16_safe_vae(folder, tmp_path / "vae")
    assert json.loads((vae / "config.json").read_text())["force_upcast"] is False
    assert json.loads((folder / "vae/config.json").read_text())["force_upcast"] is True


def test_shell_scripts_parse_and_pass_shellcheck(shellcheck: str) -> None:
    for script in SHELL_SCRIPTS:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([shellcheck, *map(str, SHELL_SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_script_targets_from_made_up_gpu_results() -> None:
    scripts = load_script(BENCHMARKS / "gpu_scripts.py", "gpu_scripts_targets")
    gpu = {"tiny": False, "device": "cuda"}

    def forward(kind: str, ratio: float, resolution: int = 1024) -> dict:
        return {"mode": "csa", "kind": kind, "resolution": resolution, "ratio": ratio,
                "stock_seconds": 0.1, "csa_seconds": 0.1 * ratio}  # fmt: skip

    results = {
        "meta": {"id_length": 4},
        "forwards": [
            forward("write", 1.08),
            forward("read-1", 1.12),
            forward("write", 1.5, resolution=768),  # not the largest size: not a target
            {**forward("read-2", 1.0), "mode": "csa-window"},  # another mode
        ],
    }
    rows = scripts.forward_targets({"status": "ok", "results": results}, gpu)
    assert [(t["target"], t["measured"], t["met"]) for t in rows] == [
        ("SDXL per forward, 1024², R = 4: CSA / stock, write", 1.08, True),
        ("SDXL per forward, 1024², R = 4: CSA / stock, read-1", 1.12, False),
    ]
    (cpu_row,) = scripts.forward_targets(
        {"status": "ok", "results": results}, gpu | {"tiny": True}
    )[:1]
    assert cpu_row["met"] is None  # never a verdict from a CPU

    def method(seconds: float) -> dict:
        return {"images": 10, "seconds_per_image": seconds, "peak_memory_gb": 9.1}

    record = {
        "status": "ok",
        "results": {"methods": {"none": method(2.0), "storydiffusion": method(2.3)}},
    }
    (row,) = scripts.consistory_targets(record, gpu)
    assert row["measured"] == 1.15 and row["met"] is False
    (missing,) = scripts.consistory_targets({"status": "timed out"}, gpu)
    assert missing["measured"] is None and missing["detail"] == "timed out"
    assert scripts.forward_targets(None, gpu) == [] and scripts.consistory_targets(None, gpu) == []
