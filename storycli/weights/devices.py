"""Where models run: the device and dtype a user asked for, and how a pipeline is
placed (offload).
"""

from __future__ import annotations

import re
import resource
import sys
from typing import Any, Literal

import torch

from storycli.errors import InvalidInput

Offload = Literal["none", "model", "sequential"]


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class InvalidOption(InvalidInput):
    """An option this machine or model cannot honour (e.g. --device cuda without a GPU)."""


def resolve_device(device: str) -> str:
    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise InvalidOption(
                f"--device {device}: no CUDA GPU is visible to torch; use --device cpu or auto"
            )
        index = int(device.partition(":")[2] or 0) if device.startswith("cuda") else 0
        if device.startswith("cuda") and index >= torch.cuda.device_count():
            raise InvalidOption(
                f"--device {device}: torch sees {torch.cuda.device_count()} GPU(s) "
                f"(cuda:0 … cuda:{torch.cuda.device_count() - 1})"
            )
        if device == "mps" and not (
            getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
        ):
            raise InvalidOption("--device mps: Apple's MPS backend is not available here")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def device_description(device: str) -> str:
    """The device in words, for benchmark records: GPU name, or CPU model, cores and threads."""
    import os
    import platform

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if match:
            name = match.group(1).strip()
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)"


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        # Half precision on GPUs; CPUs get float32 (bfloat16 is faster there but less exact).
        return torch.float32 if device == "cpu" else torch.float16
    try:
        return DTYPES[dtype]
    except KeyError:
        raise InvalidOption(f"--dtype {dtype}: choose auto, {', '.join(DTYPES)}") from None


SEQUENTIAL_ON_CPU = (
    "--offload sequential needs a CUDA device; on CPU the weights are already in host memory"
)


def check_offload(offload: str, device: str) -> None:
    """Refuse an offload mode that cannot work on `device`, before any weights are loaded."""
    # Sequential offload parks every weight on the meta device and copies it to the execution
    # device around each forward; accelerate cannot do that with the CPU as execution device
    # (a TypeError from inside it), and it would save nothing there. Model offload works on the
    # CPU (each model is moved to where it already is), so it is left alone.
    if offload == "sequential" and torch.device(device).type == "cpu":
        raise InvalidOption(SEQUENTIAL_ON_CPU)


def place_pipeline(pipe: Any, device: str, offload: Offload) -> None:
    """Put a diffusers pipeline on `device`, or arm CPU offload; silence its progress bar."""
    pipe.set_progress_bar_config(disable=True)
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)


def reset_peak_memory(device: str) -> None:
    """Count the CUDA peak from here on (a batch's earlier work ran on the same GPU)."""
    if device.startswith("cuda") and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> tuple[int, str]:
    """Peak memory since the last `reset_peak_memory`: CUDA max allocated, else the process's
    peak RSS (which cannot be reset: the process's whole life)."""
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(rss if sys.platform == "darwin" else rss * 1024), "process_peak_rss"
