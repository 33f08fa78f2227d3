"""FLUX.1 transformers written as single files the way users have them, for loaders' tests: the
original Black Forest Labs key layout (`double_blocks.N.img_attn.qkv.weight`, ...) as
.safetensors, and as a GGUF file with Q8_0 weights (small and 1-D tensors kept F16/F32, as
city96's FLUX.1 GGUF files keep them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from storycli.keyframes.flux_files import COMFY_PREFIX, bfl_tensors

# city96's convert.py keeps tensors of at most this many values unquantized.
QUANTIZATION_THRESHOLD = 1024


def bfl_state_dict(transformer: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """`transformer`'s weights in BFL's layout (the inverse of diffusers' conversion): q, k, v
    (and the single blocks' MLP input) stacked into one tensor, the final norm's rows back in
    (shift, scale) order. `prefix`: e.g. `COMFY_PREFIX`, as all-in-one checkpoints have."""
    state = transformer.state_dict()
    out = {}
    for spec in bfl_tensors(transformer.config):
        tensor = torch.cat([state[name] for name in spec.diffusers], dim=0)
        if spec.swap:
            scale, shift = tensor.chunk(2, dim=0)
            tensor = torch.cat([shift, scale], dim=0)
        out[prefix + spec.bfl] = tensor.detach().contiguous().clone()
    return out


def write_flux_safetensors(transformer: Any, path: Path, comfy: bool = False) -> Path:
    """`flux1-dev.safetensors`-style file of `transformer` (under ComfyUI's prefix: `comfy`)."""
    from safetensors.torch import save_file

    save_file(bfl_state_dict(transformer, COMFY_PREFIX if comfy else ""), str(path))
    return path


def write_flux_gguf(transformer: Any, path: Path) -> Path:
    """`flux1-dev-Q8_0.gguf`-style file of `transformer`: 2-D weights whose rows are whole
    32-value blocks quantized to Q8_0, other small ones F16, 1-D ones (biases, norm scales) F32."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    q8 = gguf.GGMLQuantizationType.Q8_0
    block, _ = gguf.GGML_QUANT_SIZES[q8]
    for name, tensor in bfl_state_dict(transformer).items():
        data = tensor.float().numpy()
        if data.ndim == 1:
            writer.add_tensor(name, data.astype(np.float32))
        elif data.size <= QUANTIZATION_THRESHOLD or data.shape[-1] % block:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, q8), raw_dtype=q8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
