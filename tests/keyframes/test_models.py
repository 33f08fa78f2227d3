"""Loading weights the way users have them: hub cache snapshots, local folders, fp16-only folders,
single-file checkpoints, missing or partial downloads, offline or with the hub unreachable.

Every model here is a tiny random one saved in the real repos' layout: a hub cache folder
`models--org--name/{blobs,refs/main,snapshots/<commit>}` whose snapshot files are symlinks to
blobs (what `hf download` leaves), diffusers subfolders, `variant="fp16"` files, and an SDXL
single-file checkpoint in the original (LDM) key layout.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hub_repos import COMMIT, hub_repo, quiet_save, save_tiny_ip_adapter_repo

from storycli.keyframes.models import load_pipeline
from storycli.weights.devices import InvalidOption
from storycli.weights.hub import ModelUnavailable

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
CONFIG_FETCH = f'hf download {SDXL_BASE} --include "*.json" "*.txt"'
STORYDIFF = [sys.executable, "-c", "from storycli.cli import main; main()"]

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------- helpers


def tree(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    """The tiny random SDXL saved as a diffusers folder (float32, plain file names)."""
    from storycli.weights.tiny import build_tiny_sdxl_pipeline

    folder = tmp_path_factory.mktemp("tiny-sdxl")
    quiet_save(build_tiny_sdxl_pipeline(), folder)
    return folder


def one_step(pipe: Any) -> Any:
    """A 1-step 32 px picture: the loaded pipeline runs end to end."""
    out = pipe(
        "a fox",
        num_inference_steps=1,
        height=32,
        width=32,
        guidance_scale=1.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    image = out.images[0]
    assert image.shape == (32, 32, 3)
    return image


# ------------------------------------------------------------------------- SDXL: layouts


def test_hub_cache_snapshot_loads_by_hub_id_offline(hub_cache: Path, tiny_folder: Path) -> None:
    hub_repo(hub_cache, "tiny-org/tiny-sdxl", tiny_folder)
    loaded = load_pipeline("tiny-org/tiny-sdxl", device="cpu")
    assert loaded.model_id == "tiny-org/tiny-sdxl"
    assert loaded.revision == COMMIT  # recorded in generate's manifest
    one_step(loaded.pipe)


def test_local_folder_loads(hub_cache: Path, tiny_folder: Path) -> None:
    loaded = load_pipeline(str(tiny_folder), device="cpu")
    assert loaded.model_id == str(tiny_folder) and loaded.revision is None
    one_step(loaded.pipe)


@pytest.fixture(scope="module")
def fp16_folder(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    """What `save_pretrained(variant="fp16")` leaves: only *.fp16.safetensors weights."""
    from storycli.weights.tiny import build_tiny_sdxl_pipeline

    folder = tmp_path_factory.mktemp("tiny-sdxl-fp16")
    quiet_save(build_tiny_sdxl_pipeline(torch.float16), folder, variant="fp16")
    weights = [name for name in tree(folder) if name.endswith(".safetensors")]
    assert weights and all(name.endswith(".fp16.safetensors") for name in weights)
    return folder


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_fp16_only_folder_loads_at_every_dtype(
    hub_cache: Path, fp16_folder: Path, dtype: str
) -> None:
    loaded = load_pipeline(str(fp16_folder), device="cpu", dtype=dtype)
    assert loaded.pipe.unet.dtype == getattr(torch, dtype)
    if dtype == "float32":
        one_step(loaded.pipe)


def test_fp16_only_hub_snapshot_loads_in_float32(hub_cache: Path, fp16_folder: Path) -> None:
    # `hf download ... --include "*/*.fp16.safetensors"` on a CPU machine (float32 there).
    hub_repo(hub_cache, "tiny-org/tiny-sdxl-fp16", fp16_folder)
    loaded = load_pipeline("tiny-org/tiny-sdxl-fp16", device="cpu", dtype="float32")
    assert loaded.pipe.unet.dtype == torch.float32
    assert loaded.revision == COMMIT


# --------------------------------------------------------------- SDXL: single-file checkpoint


def _tiny_sdxl_for_single_file() -> Any:
    """The tiny SDXL with its two text encoders at different widths (16 and 48, sum 64 = the
    UNet's cross-attention width) and the second one 10 layers deep: diffusers tells a single
    file's CLIP-L from its OpenCLIP-bigG by width, and recognises an SDXL base checkpoint by
    `conditioner.embedders.1.model.transformer.resblocks.9`, as in the real one."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from storycli.weights.tiny import TINY_SEED, build_tiny_sdxl_pipeline, text_encoder_config

    pipe = build_tiny_sdxl_pipeline()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED + 5)
        config = text_encoder_config(pipe.tokenizer)
        config.hidden_size, config.intermediate_size = 16, 64
        pipe.text_encoder = CLIPTextModel(config).eval()
        config_2 = text_encoder_config(pipe.tokenizer_2)
        config_2.hidden_size, config_2.intermediate_size = 48, 96
        config_2.num_hidden_layers = 10
        pipe.text_encoder_2 = CLIPTextModelWithProjection(config_2).eval()
    pipe.register_modules(text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2)
    return pipe


_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)


def _ldm_unet(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """diffusers UNet keys -> the original `model.diffusion_model.*` ones (the inverse of
    diffusers' `convert_ldm_unet_checkpoint`, for any `layers_per_block`)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    per = config.layers_per_block + 1
    fixed = {
        **DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"],
        **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"],
    }
    with_attention = {int(k.split(".")[1]) for k in state if re.match(r"up_blocks\.\d+\.attn", k)}

    def resnet(rest: str) -> str:
        for new, old in _RESNET:
            rest = rest.replace(new, old, 1) if rest.startswith(new) else rest
        return rest

    out = {}
    for key, value in state.items():
        if key in fixed:
            new = fixed[key]
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = 1 + block * per + j
            new = (
                f"input_blocks.{index}.0.{resnet(rest)}"
                if kind == "resnets"
                else f"input_blocks.{index}.1.{rest}"
            )
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = block * per + j
            new = (
                f"output_blocks.{index}.0.{resnet(rest)}"
                if kind == "resnets"
                else f"output_blocks.{index}.1.{rest}"
            )
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            block = int(m[1])
            slot = 2 if block in with_attention else 1
            new = f"output_blocks.{block * per + per - 1}.{slot}.conv.{m[2]}"
        else:
            raise AssertionError(f"unmapped UNet key {key}")
        out[f"model.diffusion_model.{new}"] = value
    return out


def _ldm_vae(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """diffusers VAE keys -> `first_stage_model.*` (inverse of `convert_ldm_vae_checkpoint`)."""
    blocks = len(config.up_block_types)
    attention = {
        "group_norm.": "norm.",
        "to_q.": "q.",
        "to_k.": "k.",
        "to_v.": "v.",
        "to_out.0.": "proj_out.",
    }
    out = {}
    for key, value in state.items():
        new = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(.+)", new):
            new = f"encoder.down.{m[1]}.block.{m[2]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", new):
            new = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(.+)", new):
            new = f"decoder.up.{blocks - 1 - int(m[1])}.block.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", new):
            new = f"decoder.up.{blocks - 1 - int(m[1])}.upsample.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", new):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", new):
            rest = m[2]
            for old, ldm in attention.items():
                rest = rest.replace(old, ldm)
            new = f"{m[1]}.mid.attn_1.{rest}"
        out[f"first_stage_model.{new}"] = value
    return out


def _ldm_text_encoders(te: Any, te2: Any) -> dict[str, torch.Tensor]:
    """CLIP-L as `conditioner.embedders.0.transformer.text_model.*`; the projected encoder in
    OpenCLIP's layout under `conditioner.embedders.1.model.*` (fused q/k/v, transposed
    projection)."""
    out = {}
    for key, value in te.state_dict().items():
        key = key if key.startswith("text_model.") else f"text_model.{key}"
        out[f"conditioner.embedders.0.transformer.{key}"] = value
    prefix = "conditioner.embedders.1.model."
    state = te2.state_dict()
    layers = te2.config.num_hidden_layers
    out[prefix + "token_embedding.weight"] = state["text_model.embeddings.token_embedding.weight"]
    out[prefix + "positional_embedding"] = state["text_model.embeddings.position_embedding.weight"]
    out[prefix + "ln_final.weight"] = state["text_model.final_layer_norm.weight"]
    out[prefix + "ln_final.bias"] = state["text_model.final_layer_norm.bias"]
    out[prefix + "text_projection"] = state["text_projection.weight"].T.contiguous()
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc"}
    names |= {"mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
    for i in range(layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv)
            for old, new in names.items():
                out[f"{dst}{new}.{kind}"] = state[f"{src}{old}.{kind}"]
    return out


@pytest.fixture(scope="module")
def single_file(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict[str, Path]:
    """A tiny SDXL single-file checkpoint (original key layout) and the diffusers folder whose
    json/txt files stand in for the SDXL base repo's configs."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("single-file")
    pipe = _tiny_sdxl_for_single_file()
    folder = root / "diffusers"
    quiet_save(pipe, folder)
    state = {
        **_ldm_unet(pipe.unet.state_dict(), pipe.unet.config),
        **_ldm_vae(pipe.vae.state_dict(), pipe.vae.config),
        **_ldm_text_encoders(pipe.text_encoder, pipe.text_encoder_2),
    }
    checkpoint = root / "my-sdxl.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(checkpoint))
    reference = one_step(pipe)
    torch.save(torch.from_numpy(reference), root / "reference.pt")
    return {"checkpoint": checkpoint, "configs": folder, "reference": root / "reference.pt"}


def test_single_file_loads_with_the_sdxl_configs_cached(
    hub_cache: Path, single_file: dict[str, Path]
) -> None:
    hub_repo(hub_cache, SDXL_BASE, single_file["configs"], patterns=("*.json", "*.txt"))
    loaded = load_pipeline(str(single_file["checkpoint"]), device="cpu")
    assert loaded.model_id == str(single_file["checkpoint"])
    image = one_step(loaded.pipe)
    # The converted weights are the original ones: the same picture as before saving.
    assert torch.allclose(torch.from_numpy(image), torch.load(single_file["reference"]), atol=1e-5)


def test_single_file_without_the_sdxl_configs_says_which_to_fetch(
    hub_cache: Path, single_file: dict[str, Path]
) -> None:
    started = time.monotonic()
    with pytest.raises(ModelUnavailable) as info:
        load_pipeline(str(single_file["checkpoint"]), device="cpu")
    message = str(info.value)
    assert time.monotonic() - started < 5
    assert SDXL_BASE in message and f"`{CONFIG_FETCH}`" in message, message
    assert "\n" not in message


# ---------------------------------------------------------- SDXL: partial snapshots, messages


SDXL_LISTING = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer_2/tokenizer.json",
    "tokenizer_2/tokenizer_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    # Like the real repo's second VAE folder: not a pipeline component, wanted all the same.
    "vae_1_0/config.json",
    "vae_1_0/diffusion_pytorch_model.safetensors",
)


def test_incomplete_snapshot_reports_the_missing_file(hub_cache: Path, tiny_folder: Path) -> None:
    assert set(tree(tiny_folder)) == set(SDXL_LISTING) - {n for n in SDXL_LISTING if "_1_0" in n}
    hub_repo(hub_cache, "tiny-org/tiny-sdxl", tiny_folder, listing=SDXL_LISTING)
    with pytest.raises(ModelUnavailable) as info:
        load_pipeline("tiny-org/tiny-sdxl", device="cpu")
    message = str(info.value)
    assert "vae_1_0/diffusion_pytorch_model.safetensors" in message, message
    assert "not in the local Hugging Face cache" not in message
    assert "hf download tiny-org/tiny-sdxl" in message and "\n" not in message


def test_snapshot_without_weights_passes_the_reason_through(
    hub_cache: Path, tiny_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # No tree listing cached (copied by hand): diffusers finds the gap only when loading.
    hub_repo(hub_cache, "tiny-org/tiny-sdxl", tiny_folder, patterns=("*.json", "*.txt"))
    with pytest.raises(ModelUnavailable) as info:
        load_pipeline("tiny-org/tiny-sdxl", device="cpu")
    message = str(info.value)
    assert "not in the local Hugging Face cache" not in message
    assert "diffusion_pytorch_model" in message or "model.safetensors" in message, message
    assert "\n" not in message
    # Only our sentence: not diffusers' own ERROR line about the missing safetensors file too.
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []


def test_hub_revision_of_any_cached_file(hub_cache: Path, tiny_folder: Path) -> None:
    from storycli.weights.hub import hub_revision

    hub_repo(hub_cache, "tiny-org/tiny-vae", tiny_folder / "vae")
    assert hub_revision("tiny-org/tiny-vae", "config.json") == COMMIT
    assert hub_revision("tiny-org/tiny-vae", "model_index.json") is None
    assert hub_revision("tiny-org/not-cached", "config.json") is None


# ------------------------------------------------------------------- stage two: hub layouts


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument")  # the CLI hides it
def test_latent_slerp_records_the_vae_snapshot_revision(hub_cache: Path, tiny_folder: Path) -> None:
    from storycli.motion.decoders.registry import load_decoder

    hub_repo(hub_cache, "tiny-org/tiny-vae", tiny_folder / "vae")
    decoder = load_decoder("latent-slerp", "tiny-org/tiny-vae", device="cpu")
    described = decoder.describe()
    assert described == {
        "decoder": "latent-slerp",
        "vae": "tiny-org/tiny-vae",
        "vae_revision": COMMIT,
    }
    # A local folder (here a pipeline folder with vae/) has no hub revision.
    local = load_decoder("latent-slerp", str(tiny_folder), device="cpu")
    assert local.describe()["vae"] == str(tiny_folder) and local.describe()["vae_revision"] is None


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument")  # the CLI hides it
def test_vit_h_encoder_loads_from_its_hub_layout_offline(hub_cache: Path, tmp_path: Path) -> None:
    from PIL import Image

    from storycli.weights.image_encoder import load_image_encoder

    save_tiny_ip_adapter_repo(tmp_path / "ip-adapter")
    hub_repo(hub_cache, "h94/IP-Adapter", tmp_path / "ip-adapter")
    encoder = load_image_encoder("openclip-vit-h", device="cpu")
    assert encoder.name == "openclip-vit-h" and encoder.revision == COMMIT and encoder.dim == 32
    # No preprocessor config in the folder: CLIPImageProcessor's defaults (224 px crops).
    assert encoder.processor.crop_size == {"height": 224, "width": 224}
    assert encoder.encode([Image.new("RGB", (40, 30), "red")]).shape == (1, 32)


def test_offline_cli_load_from_the_hub_cache_is_quiet(tmp_path: Path, tiny_folder: Path) -> None:
    # No "Could not reach the Hub ... Using cached commit hash", no "Loading pipeline components".
    hub_repo(tmp_path / "hub", "tiny-org/tiny-sdxl", tiny_folder)
    story = tmp_path / "story.yaml"
    story.write_text(
        yaml.safe_dump(
            {
                "name": "one",
                "model": "tiny-org/tiny-sdxl",
                "frames": ["a fox in the snow"],
                "width": 64,
                "height": 64,
                "steps": 1,
                "consistency": {"method": "none"},
            }
        ),
        encoding="utf-8",
    )
    env = cli_env(tmp_path, "offline") | {"HF_HUB_CACHE": str(tmp_path / "hub")}
    proc = subprocess.run(
        [*STORYDIFF, "generate", str(story), "--out", str(tmp_path / "out"), "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    manifest = json.loads((tmp_path / "out" / "one" / "manifest.json").read_text())
    assert manifest["model"]["revision"] == COMMIT


# ------------------------------------------------------------------ missing weights, fast


def closed_port() -> int:
    """A local TCP port nothing listens on: connections to it are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli_env(tmp_path: Path, hub: str) -> dict[str, str]:
    """A subprocess environment with an empty cache; `hub`: offline mode on, or not set and the
    hub endpoint a closed local port (hub unreachable, as on a machine without network)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env |= {"HF_HOME": str(tmp_path / "hf-home"), "NO_COLOR": "1", "COLUMNS": "200"}
    env |= {"OMP_NUM_THREADS": "1"}
    if hub == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    return env


def point_hub_at(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Offline mode off and huggingface_hub's endpoint `endpoint` (read at import otherwise)."""
    import huggingface_hub.constants as constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)


@pytest.fixture
def unreachable_hub(hub_offline: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Empty cache, offline mode off, and the hub endpoint a closed local port."""
    point_hub_at(monkeypatch, f"http://127.0.0.1:{closed_port()}")


@pytest.fixture
def answering_hub(hub_offline: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Empty cache, offline mode off, and a local "hub" that knows no repo (404 to all)."""
    import http.server
    import threading

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"error": "Repository not found"}'
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_HEAD = do_GET

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    point_hub_at(monkeypatch, f"http://127.0.0.1:{server.server_port}")
    yield
    server.shutdown()
    server.server_close()


def _load(name: str) -> Any:
    from storycli.motion.decoders.registry import load_decoder
    from storycli.weights.image_encoder import load_image_encoder

    if name == "encoder":
        return load_image_encoder(device="cpu")
    return load_decoder(name, device="cpu")


UNCACHED = {
    "latent-slerp": "madebyollin/sdxl-vae-fp16-fix",
    "encoder": "h94/IP-Adapter",
    "animatediff": "h94/IP-Adapter",  # the IP-Adapter file is looked for first
}


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument")  # the CLI hides it
@pytest.mark.parametrize("hub", ["offline", "unreachable"])
@pytest.mark.parametrize("name", list(UNCACHED))
def test_uncached_stage_two_weights_fail_fast_in_one_sentence(
    request: pytest.FixtureRequest,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    name: str,
    hub: str,
) -> None:
    request.getfixturevalue("hub_offline" if hub == "offline" else "unreachable_hub")
    # Imports first (seconds on a small CPU): only the load itself is timed.
    import diffusers  # noqa: F401
    from diffusers import AnimateDiffSparseControlNetPipeline, AutoencoderKL  # noqa: F401
    from transformers import CLIPVisionModelWithProjection  # noqa: F401

    capfd.readouterr()
    started = time.monotonic()
    with pytest.raises(ModelUnavailable) as info:
        _load(name)
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert elapsed < 3, f"{elapsed:.1f} s"
    assert UNCACHED[name] in message and f"`hf download {UNCACHED[name]}" in message, message
    assert "\n" not in message and message.count(". ") == 0  # one sentence
    assert capfd.readouterr().err == ""
    assert [r.getMessage() for r in caplog.records if r.levelname != "DEBUG"] == []


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument")
def test_hub_that_answers_not_found_is_reported_at_once(
    answering_hub: None, capfd: pytest.CaptureFixture[str]
) -> None:
    from diffusers import AutoencoderKL  # noqa: F401  (imported before the clock starts)

    from storycli.motion.decoders.registry import load_decoder

    started = time.monotonic()
    with pytest.raises(ModelUnavailable) as info:
        load_decoder("latent-slerp", "tiny-org/no-such-vae", device="cpu")
    message = str(info.value)
    assert time.monotonic() - started < 3
    assert "tiny-org/no-such-vae" in message and "has no repository" in message, message
    assert "hf auth login" in message
    assert "\n" not in message
    assert capfd.readouterr().err == ""


def _cli_args(command: str, tmp_path: Path) -> list[str]:
    if command == "train-predictor":
        from storycli.motion.video.synthetic import write_synthetic_dataset

        data = tmp_path / "clips"
        write_synthetic_dataset(data, videos=1, seconds=1.0, fps=8, seed=1, frame_folders=0)
        return ["train-predictor", "--data", str(data), "--out", str(tmp_path / "run")]
    from PIL import Image

    folder = tmp_path / "keyframes"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (100 * i, 50, 0)).save(folder / f"{i}.png")
    return ["animate", str(folder), "--decoder", "latent-slerp", "--out", str(tmp_path / "video")]


def _run_cli(
    args: list[str], tmp_path: Path, hub: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    proc = subprocess.run(
        [*STORYDIFF, *args],
        cwd=tmp_path,
        env=cli_env(tmp_path, hub),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, time.monotonic() - started


@pytest.mark.parametrize(
    ("command", "json_out"),
    [("animate", False), ("animate", True), ("train-predictor", False)],
)
def test_cli_uncached_stage_two_weights_one_line_fast(
    tmp_path: Path, command: str, json_out: bool
) -> None:
    repo = "madebyollin/sdxl-vae-fp16-fix" if command == "animate" else "h94/IP-Adapter"
    args = _cli_args(command, tmp_path) + (["--json"] if json_out else [])
    runs = {hub: _run_cli(args, tmp_path, hub) for hub in ("offline", "unreachable")}
    for hub, (proc, _) in runs.items():
        assert proc.returncode == 1, (hub, proc.stderr)
        # (The progress display, stopped before it showed anything, may leave a blank line.)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, (hub, proc.stderr)
        assert lines[0].startswith("error: ") and repo in lines[0], lines[0]
        assert f"`hf download {repo}" in lines[0]
        if json_out:  # one JSON line for the failed folder, its error included
            [record] = [json.loads(line) for line in proc.stdout.splitlines()]
            assert record["status"] == "failed" and record["exit_code"] == 1
            assert lines[0].removeprefix("error: ") in record["errors"]
        else:
            assert proc.stdout == ""
    # Unreachable costs no more than offline (huggingface_hub's retries alone take ~25 s).
    assert runs["unreachable"][1] < runs["offline"][1] + 10, {h: r[1] for h, r in runs.items()}


# ------------------------------------------------------------------------------ --offload


SEQUENTIAL_ON_CPU = (
    "--offload sequential needs a CUDA device; on CPU the weights are already in host memory"
)


@pytest.mark.parametrize("what", ["generate", "animatediff"])
def test_sequential_offload_on_cpu_is_refused_before_loading(hub_offline: None, what: str) -> None:
    from storycli.motion.decoders.registry import load_decoder

    # Uncached models: refused before any weights are looked for.
    with pytest.raises(InvalidOption) as info:
        if what == "generate":
            load_pipeline("tiny-org/not-cached", device="cpu", offload="sequential")
        else:
            load_decoder("animatediff", "org/not-cached-sd15", device="cpu", offload="sequential")
    assert str(info.value) == SEQUENTIAL_ON_CPU


@pytest.mark.parametrize("command", ["generate", "animate"])
def test_cli_sequential_offload_on_cpu_exits_2(tmp_path: Path, command: str) -> None:
    from typer.testing import CliRunner

    from storycli.cli import app

    if command == "generate":
        story = tmp_path / "story.yaml"
        story.write_text(yaml.safe_dump({"name": "one", "model": "tiny", "frames": ["a fox"]}))
        args = ["generate", str(story), "--out", str(tmp_path / "out")]
    else:
        args = _cli_args("animate", tmp_path)
        args[args.index("latent-slerp")] = "animatediff"
        args += ["--model", "tiny"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--offload", "sequential"])
    assert result.exit_code == 2, result.output
    assert SEQUENTIAL_ON_CPU in result.output.replace("\n", " ")


def test_model_offload_works_on_cpu(hub_offline: None) -> None:
    loaded = load_pipeline("tiny", device="cpu", offload="model")
    one_step(loaded.pipe)


# ----------------------------------------------------- what a model resolves to, unloaded


def test_resolved_description_is_the_loaded_ones(
    hub_cache: Path, tiny_folder: Path, single_file: dict[str, Path]
) -> None:
    """`generate` keys frames with the description it has without loading; a load must not
    change it."""
    from storycli.keyframes.models import resolve_model

    hub_repo(hub_cache, SDXL_BASE, single_file["configs"], patterns=("*.json", "*.txt"))
    for model in ("tiny", str(tiny_folder), str(single_file["checkpoint"])):
        resolved = resolve_model(model, device="cpu")
        loaded = load_pipeline(model, device="cpu")
        assert resolved.describe() == loaded.describe(), model
        assert resolved.long_side == loaded.long_side
    assert resolve_model("tiny", device="cpu").describe()["preset"] == "tiny"
    assert resolve_model(str(tiny_folder), device="cpu").model_id == str(tiny_folder)


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument")  # the CLI hides it
def test_vae_from_the_hub_cache_records_its_revision(hub_cache: Path, tiny_folder: Path) -> None:
    from storycli.keyframes.models import resolve_model

    hub_repo(hub_cache, "tiny-org/tiny-vae", tiny_folder / "vae")
    loaded = load_pipeline("tiny", device="cpu", vae="tiny-org/tiny-vae")
    described = loaded.describe()
    assert described["vae"] == "tiny-org/tiny-vae" and described["vae_revision"] == COMMIT
    assert described == resolve_model("tiny", device="cpu", vae="tiny-org/tiny-vae").describe()
    assert loaded.pipe.vae.config._name_or_path == "tiny-org/tiny-vae"  # not the built-in one
    one_step(loaded.pipe)
