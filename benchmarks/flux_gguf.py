"""A random-weight Q8_0 GGUF file of a FLUX.1 transformer, laid out as city96/FLUX.1-dev-gguf's
`flux1-dev-Q8_0.gguf` is (Black Forest Labs' tensor names; 2-D weights whose rows are whole
32-value blocks in Q8_0, other small ones F16, 1-D ones F32), and loaded back through storycli's
own loader (`storycli.keyframes.flux_files.load_flux_transformer_file`, what `model:
flux1-dev-Q8_0.gguf` runs): the GGUF part of `benchmarks/csa_dit.py` (issue 22's "Q8 GGUF story
peak ≤ 17 GiB").

No one can download the real file here, and quantizing a random 12 B bfloat16 model with
`gguf.quants.quantize` (numpy, one core) would take minutes, so the Q8_0 blocks are drawn
directly: a float16 scale and 32 random int8 values each, made on the device (seconds for
12 B values on a GPU) and written tensor by tensor (`GGUFWriter.add_tensor_info`, then
`write_tensor_data`), so the host never holds more than one tensor beyond the file. Each
weight's scale makes its values spread like `nn.Linear`'s default initialisation (std
1/√(3·fan_in)): the activations stay finite through 57 blocks, as they do with real weights.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

GIB = 2**30
Q8_BLOCK = 32  # values per Q8_0 block; each block is a float16 scale and 32 int8 values
Q8_BLOCK_BYTES = 2 + Q8_BLOCK
# city96's convert.py keeps tensors of at most this many values unquantized (as
# tests/flux_checkpoints.py does for the loaders' tests).
QUANTIZATION_THRESHOLD = 1024
# int8 values drawn uniformly from [-127, 127] have this standard deviation.
INT8_STD = (((2 * 127 + 1) ** 2 - 1) / 12) ** 0.5


def bfl_shapes(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a FLUX.1 transformer with diffusers config `config`, in Black Forest
    Labs' layout and order: (name, shape), from the model built on the meta device (no memory)."""
    import torch
    from diffusers import FluxTransformer2DModel

    from storycli.keyframes.flux_files import bfl_tensors

    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    out = []
    for spec in bfl_tensors(config):
        parts = [shapes[name] for name in spec.diffusers]
        out.append((spec.bfl, (sum(p[0] for p in parts), *parts[0][1:])))
    return out


def quant_kind(name: str, shape: tuple[int, ...]) -> str:
    """ "F32" (1-D), "F16" (small, or rows that are not whole blocks) or "Q8_0", as city96's
    files store FLUX.1's tensors."""
    if len(shape) == 1:
        return "F32"
    if math.prod(shape) <= QUANTIZATION_THRESHOLD or shape[-1] % Q8_BLOCK:
        return "F16"
    return "Q8_0"


class GgufTensor(NamedTuple):
    """One tensor of the file: its BFL name, (unquantized) shape, kind and bytes of data."""

    name: str
    shape: tuple[int, ...]
    kind: str
    nbytes: int


def gguf_tensors(config: dict[str, Any]) -> list[GgufTensor]:
    """The file's tensors, in order, for a FLUX.1 transformer of diffusers config `config`."""
    out = []
    for name, shape in bfl_shapes(config):
        kind, values = quant_kind(name, shape), math.prod(shape)
        nbytes = {"F32": 4 * values, "F16": 2 * values}.get(
            kind, values // Q8_BLOCK * Q8_BLOCK_BYTES
        )
        out.append(GgufTensor(name, shape, kind, nbytes))
    return out


def file_bytes(tensors: list[GgufTensor]) -> int:
    """The file's tensor data in bytes (without header and padding)."""
    return sum(t.nbytes for t in tensors)


def random_tensor(name: str, shape: tuple[int, ...], kind: str, generator: Any) -> Any:
    """One tensor's bytes as numpy, drawn on the generator's device: norm scales 1, biases 0,
    F16 weights normal, Q8_0 weights as blocks of (float16 scale, 32 int8 values) — the byte
    layout ggml's `block_q8_0` has, which diffusers' `dequantize_blocks_Q8_0` reads."""
    import torch

    device = generator.device
    if kind == "F32":
        fill = 1.0 if name.endswith(".scale") else 0.0
        return torch.full(shape, fill, dtype=torch.float32).numpy()
    std = (3 * shape[-1]) ** -0.5  # nn.Linear's default init: uniform, std 1/√(3·fan_in)
    if kind == "F16":
        values = torch.randn(shape, generator=generator, device=device) * std
        return values.to(torch.float16).cpu().numpy()
    rows, blocks = shape[0], shape[-1] // Q8_BLOCK
    data = torch.randint(
        -127, 128, (rows, blocks, Q8_BLOCK_BYTES), generator=generator, device=device,
        dtype=torch.int8,
    )  # fmt: skip
    scale = torch.full((rows, blocks, 1), std / INT8_STD, dtype=torch.float16, device=device)
    data[..., :2] = scale.view(torch.int8)  # little-endian float16 in the block's first 2 bytes
    return data.view(torch.uint8).reshape(rows, blocks * Q8_BLOCK_BYTES).cpu().numpy()


def write_random_gguf(tensors: list[GgufTensor], path: Path, device: Any, seed: int) -> dict:
    """Write `path`: a random Q8_0 GGUF FLUX.1 transformer of these tensors (`gguf_tensors`;
    what `model: flux1-dev-Q8_0.gguf` loads). Returns the file's size, tensor counts per kind
    and the seconds taken."""
    import gguf
    import numpy as np
    import torch

    started = time.perf_counter()
    kinds = [t.kind for t in tensors]
    writer = gguf.GGUFWriter(str(path), arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, shape, kind, nbytes in tensors:
        if kind == "Q8_0":
            byte_shape = (shape[0], shape[-1] // Q8_BLOCK * Q8_BLOCK_BYTES)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=q8)
        else:
            dtype = np.dtype(np.float32 if kind == "F32" else np.float16)
            writer.add_tensor_info(name, shape, dtype, nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, shape, kind, _ in tensors:
        writer.write_tensor_data(random_tensor(name, shape, kind, generator))
    writer.close()
    return {
        "file_bytes": path.stat().st_size,
        "tensors": {k: kinds.count(k) for k in sorted(set(kinds))},
        "write_seconds": round(time.perf_counter() - started, 3),
    }


def scratch_folder(need_bytes: int) -> Path:
    """Where the file goes: /dev/shm when it and the memory have room (the GPU machine's disk
    speed is unknown; its memory is 125 GiB), else the temp folder. A file in /dev/shm is
    memory, and loading copies it once more: so three times its size must be free."""
    shm = Path("/dev/shm")
    roomy = shm.is_dir() and shutil.disk_usage(shm).free > need_bytes * 1.2
    return shm if roomy and available_memory() > 3 * need_bytes else Path(tempfile.gettempdir())


def available_memory() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def gguf_transformer(config: dict[str, Any], device: Any, dtype: Any, seed: int) -> tuple:
    """(transformer, record): a random Q8_0 GGUF file of `config` written to a scratch folder,
    loaded by storycli's loader (computing in `dtype`) with `config` as its
    `transformer/config.json`, moved to `device`; the file is deleted once loaded."""
    from storycli.keyframes.flux_files import load_flux_transformer_file

    tensors = gguf_tensors(config)  # (builds the model on meta: once)
    with tempfile.TemporaryDirectory(
        dir=scratch_folder(file_bytes(tensors)), prefix="flux-gguf-"
    ) as tmp:
        folder = Path(tmp)
        (folder / "transformer").mkdir()
        (folder / "transformer/config.json").write_text(
            json.dumps({"_class_name": "FluxTransformer2DModel", **config})
        )
        path = folder / "flux1-dev-Q8_0.gguf"
        record = write_random_gguf(tensors, path, device, seed) | {"folder": str(folder.parent)}
        started = time.perf_counter()
        transformer = load_flux_transformer_file(path, dtype, folder)
        record["load_seconds"] = round(time.perf_counter() - started, 3)
    started = time.perf_counter()
    transformer = transformer.to(device).eval().requires_grad_(False)
    record["to_device_seconds"] = round(time.perf_counter() - started, 3)
    return transformer, record
