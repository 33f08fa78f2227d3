"""benchmarks/flux_gguf.py: the random Q8_0 GGUF FLUX.1 file csa_dit.py's GGUF part loads, at a
small width: laid out as city96's files are, read as FLUX.1-dev by storycli, loaded by its
loader into GGUF layers whose weights spread as `nn.Linear`'s default initialisation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bench_scripts import BENCHMARKS, load_script

pytest.importorskip("gguf")


def small_config() -> dict:
    csa_dit = load_script(BENCHMARKS / "csa_dit.py", "bench_csa_dit_for_gguf")
    return csa_dit.FLUX_DEV_TRANSFORMER | {
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 4,
        "axes_dims_rope": (4, 6, 6),
    }


@pytest.fixture(scope="module")
def bench():
    return load_script(BENCHMARKS / "flux_gguf.py", "bench_flux_gguf")


def test_file_has_city96s_layout_and_reads_as_flux_dev(bench, tmp_path: Path) -> None:
    import gguf

    from storycli.keyframes.flux_files import bfl_tensors, flux_file_variant

    config = small_config()
    path = tmp_path / "flux1-dev-Q8_0.gguf"
    tensors = bench.gguf_tensors(config)
    record = bench.write_random_gguf(tensors, path, torch.device("cpu"), seed=0)
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert list(types) == [spec.bfl for spec in bfl_tensors(config)]  # BFL's names, in order
    assert types["double_blocks.0.img_attn.qkv.weight"] == "Q8_0"
    assert types["double_blocks.0.img_attn.qkv.bias"] == "F32"
    assert types["double_blocks.0.img_attn.norm.query_norm.scale"] == "F32"
    assert types["final_layer.linear.weight"] == "Q8_0"  # 64 × 64: over the 1,024-value threshold
    counts = {kind: list(types.values()).count(kind) for kind in set(types.values())}
    assert record["tensors"] == counts and record["file_bytes"] == path.stat().st_size
    data = sum(int(t.n_bytes) for t in reader.tensors)
    assert data == bench.file_bytes(tensors) < record["file_bytes"]
    assert flux_file_variant(path) == "dev"


def test_loaded_by_storyclis_loader_into_gguf_layers(bench) -> None:
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    config = small_config()
    transformer, record = bench.gguf_transformer(config, "cpu", torch.float32, seed=0)
    assert not Path(record["folder"], "flux1-dev-Q8_0.gguf").exists()  # deleted once loaded
    assert record["load_seconds"] > 0 and record["write_seconds"] > 0
    qkv = transformer.transformer_blocks[0].attn.to_q
    assert type(qkv).__name__ == "GGUFLinear"
    assert qkv.weight.quant_type == 8  # GGMLQuantizationType.Q8_0
    weight = dequantize_gguf_tensor(qkv.weight).float()
    assert weight.shape == (64, 64)
    assert weight.std().item() == pytest.approx((3 * 64) ** -0.5, rel=0.1)
    norm = transformer.transformer_blocks[0].attn.norm_q.weight
    assert torch.equal(norm, torch.ones_like(norm))
    grid, text = 4, 8
    ids = torch.zeros(grid * grid, 3)
    out = transformer(
        hidden_states=torch.randn(1, grid * grid, config["in_channels"]),
        encoder_hidden_states=torch.randn(1, text, config["joint_attention_dim"]),
        pooled_projections=torch.randn(1, config["pooled_projection_dim"]),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]),
        img_ids=ids,
        txt_ids=torch.zeros(text, 3),
        return_dict=False,
    )[0]
    assert out.shape == (1, grid * grid, config["in_channels"])
    assert torch.isfinite(out).all()


def test_quant_kinds_follow_city96s_rules(bench) -> None:
    assert bench.quant_kind("x.bias", (3072,)) == "F32"
    assert bench.quant_kind("x.weight", (32, 32)) == "F16"  # 1,024 values: kept
    assert bench.quant_kind("x.weight", (64, 48)) == "F16"  # rows not whole 32-value blocks
    assert bench.quant_kind("x.weight", (64, 64)) == "Q8_0"
