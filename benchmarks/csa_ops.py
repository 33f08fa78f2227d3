#!/usr/bin/env python
"""Count what CSA launches: operators, copies and host-to-device copies per denoising step.

A GPU runs one or more kernels per operator and waits on every host-to-device copy, so the
operators and copies CSA adds to a forward are its overhead beyond the attention FLOPs. This
counts them without a GPU: the **real SDXL UNet** (``sdxl_unet_config.json``) is built on
PyTorch's ``meta`` device, where every operator is dispatched (shapes only, no arithmetic), and
a dispatch mode records each operator run inside the self-attention layers CSA replaces. CSA's
draws stay on the CPU as in a real run, so each index or mask moved to the model's device shows
up as a cross-device copy, exactly where a GPU would pay one. Byte counts are those at the
story's real size in float16.

One denoising step of ``stories/two_friends.yaml`` (2 characters, 9 frames, 1024×768) is driven
as ``generate_keyframes`` drives it (the package's own ``story_chunks``, ``CSAState.open_call``,
``enter``/``leave``), with CSA in every replaced layer (warm-up 0, probability 1), against the
same story with ``consistency.method: none``. Run it against another checkout with
``PYTHONPATH=<checkout> python benchmarks/csa_ops.py`` to compare implementations.

    python benchmarks/csa_ops.py                     # prints the table, seconds
    python benchmarks/csa_ops.py --json out.json     # and writes the record
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Operators that only move or rearrange bytes (a kernel each on a GPU, no arithmetic).
COPIES = {
    "cat",
    "stack",
    "index",
    "index_select",
    "gather",
    "repeat_interleave",
    "repeat",
    "constant_pad_nd",
    "clone",
    "_to_copy",
    "copy_",
    "expand_copy",
    "lift_fresh_copy",
    "_unsafe_view",
}
VIEWS = {"view", "_reshape_alias", "expand", "transpose", "slice", "select", "unsqueeze", "t"}


class OpCounter(TorchDispatchMode):
    """Records the operators dispatched while `active`, with their output bytes and whether
    they moved data between devices."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.ops: Counter[str] = Counter()
        self.copy_bytes = 0
        self.cross_device = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.active:
            name = func.overloadpacket.__name__
            self.ops[name] += 1
            if name in COPIES:
                tensors = out if isinstance(out, (tuple, list)) else (out,)
                self.copy_bytes += sum(
                    t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)
                )
            devices = {
                a.device.type
                for a in (*args, *(kwargs or {}).values())
                if isinstance(a, torch.Tensor)
            }
            if isinstance(out, torch.Tensor) and devices and out.device.type not in devices:
                self.cross_device += 1
        return out

    def summary(self) -> dict[str, Any]:
        kernels = sum(n for name, n in self.ops.items() if name not in VIEWS)
        copies = sum(n for name, n in self.ops.items() if name in COPIES)
        return {
            "operators": kernels,
            "copies": copies,
            "copy_mib": round(self.copy_bytes / 2**20, 1),
            "cross_device_copies": self.cross_device,
        }


def build_unet() -> Any:
    from diffusers import UNet2DConditionModel

    config = json.loads((HERE / "sdxl_unet_config.json").read_text())
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config).to(torch.float16).eval()


def one_step(unet: Any, method: str, frame_batch: int) -> dict[str, Any]:
    """Every forward of one denoising step of two_friends.yaml, counted in the CSA layers."""
    try:
        from storycli.consistency.csa_state import CSAState
        from storycli.keyframes.backbones.sdxl import csa_layers, installed_csa
    except ImportError:  # checkouts before the backbone seam (see the module doc)
        from storycli.consistency.csa import CSAState, csa_layers, installed_csa  # type: ignore[no-redef]

    # From keyframes, where older checkouts have it too (see the module doc).
    from storycli.keyframes.loop import bank_settings, csa_settings, read_characters, story_chunks
    from storycli.keyframes.plan import build_plan
    from storycli.story.loader import load_story

    overrides = {
        "consistency": {
            "method": method,
            "id_length": 2,  # as the story file says (an override replaces the mapping)
            "warmup_steps": 0,
            "prob_early": 1.0,
            "prob_late": 1.0,
        }
    }
    plan = build_plan(load_story(ROOT / "stories" / "two_friends.yaml", overrides=overrides))
    story = plan.story
    layers = csa_layers(unet, story.consistency.blocks)
    chunks = story_chunks(plan, plan.calls, frame_batch)
    counter = OpCounter()
    names = {layer.name for layer in layers}
    modules = dict(unet.named_modules())

    def on(*_: Any) -> None:
        counter.active = True

    def off(*_: Any) -> None:
        counter.active = False

    handles = [modules[n].register_forward_pre_hook(on) for n in names]
    handles += [modules[n].register_forward_hook(off) for n in names]
    latent = (4, story.height // 8, story.width // 8)
    state = None
    if story.uses_csa:
        settings = csa_settings(plan)
        state = CSAState(settings, layers, bank_settings(plan))
    rows = 0
    try:
        with torch.inference_mode(), counter:
            guard = installed_csa(unet, state) if state is not None else _nothing()
            with guard:
                streams = {}
                if state is not None:
                    streams = {
                        n: [
                            state.open_call(
                                "off" if call.phase == "plain" else call.phase,
                                n_images=len(call.frames),
                                seed=call.csa_seed,
                                character=call.character,
                                read_characters=read_characters(plan, call),
                            )
                            for call in chunk.calls
                        ]
                        for n, chunk in enumerate(chunks)
                    }
                for n, chunk in enumerate(chunks):
                    batch = 2 * len(chunk.rows)  # CFG
                    rows += len(chunk.rows)
                    if state is not None:
                        state.enter(streams[n])
                    with torch.device("meta"):  # the inputs; CSA draws on the CPU
                        sample = torch.empty(batch, *latent, dtype=torch.float16)
                        text = torch.empty(batch, 77, 2048, dtype=torch.float16)
                        added = {
                            "text_embeds": torch.empty(batch, 1280, dtype=torch.float16),
                            "time_ids": torch.empty(batch, 6, dtype=torch.float16),
                        }
                        timestep = torch.tensor(500.0)
                    unet(sample, timestep, encoder_hidden_states=text, added_cond_kwargs=added)
                    if state is not None:
                        state.leave()
    finally:
        for handle in handles:
            handle.remove()
    return {
        "method": method,
        "frame_batch": frame_batch,
        "forwards": len(chunks),
        "frames": rows,
        "layers": len(layers),
    } | counter.summary()


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frame-batch", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--json", type=Path, help="also write the records here")
    args = parser.parse_args(argv)
    import storycli

    unet = build_unet()
    records = [
        one_step(unet, method, frame_batch)
        for frame_batch in args.frame_batch
        for method in ("none", "storydiffusion")
    ]
    print(f"storycli from {Path(storycli.__file__).parent}, torch {torch.__version__}")
    print("one step of two_friends.yaml at 1024x768, fp16, the replaced self-attention layers:")
    head = "method           frame_batch forwards operators copies copy MiB cross-device"
    print(head)
    for r in records:
        print(
            f"{r['method']:<16} {r['frame_batch']:>11} {r['forwards']:>8} {r['operators']:>9} "
            f"{r['copies']:>6} {r['copy_mib']:>8} {r['cross_device_copies']:>12}"
        )
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "records": records}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
