"""The AnimateDiff + SparseCtrl + IP-Adapter transition decoder, on the tiny random stack.

Everything runs offline on the CPU: 2 denoising steps, 8 frames, 64-px frames.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from storycli.config import ConfigFileError
from storycli.motion.decoders.animatediff import (
    AnimateDiffDecoder,
    lerp_frames,
    load_animatediff_decoder,
    render_size,
)
from storycli.motion.decoders.base import TransitionRequest
from storycli.motion.presets import (
    DEFAULT_VIDEO_PRESET,
    VideoPresetError,
    load_video_presets,
    resolve_video_preset,
)
from storycli.weights.hub import ModelUnavailable

FRAMES = 8
EMBED_DIM = 32  # the tiny image encoder's projection_dim


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def decoder(one_thread: None) -> AnimateDiffDecoder:
    return load_animatediff_decoder("tiny", device="cpu")


def keyframe(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR)


def embeddings(seed: int = 0) -> torch.Tensor:
    return torch.randn(FRAMES, EMBED_DIM, generator=torch.Generator().manual_seed(seed))


def request(size: tuple[int, int] = (64, 64), **changes: object) -> TransitionRequest:
    base = TransitionRequest(
        start=keyframe(size, 1),
        end=keyframe(size, 2),
        frames=FRAMES,
        embeddings=embeddings(),
        start_prompt="a red fox in the forest",
        end_prompt="a red fox by the river",
        seed=7,
    )
    return dataclasses.replace(base, **changes)


def pixels(frames: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(frame, dtype=np.float32) for frame in frames])


def per_frame_change(a: list[Image.Image], b: list[Image.Image]) -> np.ndarray:
    return np.abs(pixels(a) - pixels(b)).mean(axis=(1, 2, 3))


@pytest.fixture(scope="module")
def reference(decoder: AnimateDiffDecoder) -> list[Image.Image]:
    return decoder.transition(request())


# ------------------------------------------------------------------------------------ presets


def test_default_presets_load() -> None:
    presets = load_video_presets()
    default = presets[DEFAULT_VIDEO_PRESET]
    assert default.base == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert default.motion_adapter == "guoyww/animatediff-motion-adapter-v1-5-3"
    assert default.sparsectrl == "guoyww/animatediff-sparsectrl-rgb"
    assert default.ip_adapter is not None and default.image_encoder is not None
    assert default.ip_adapter.weight_name == "ip-adapter_sd15.safetensors"
    assert default.image_encoder.where == "h94/IP-Adapter/models/image_encoder"
    assert (default.size, default.fps, default.steps) == (512, 8, 25)
    assert presets["tiny"].tiny and not default.tiny


def test_model_names_resolve_to_presets_or_a_base_model() -> None:
    presets = load_video_presets()
    assert resolve_video_preset("tiny", presets) is presets["tiny"]
    for model in ("someone/my-sd15-finetune", "./models/my-sd15"):
        preset = resolve_video_preset(model, presets)
        assert preset.base == model and preset.variant is None
        assert preset.motion_adapter == presets[DEFAULT_VIDEO_PRESET].motion_adapter
        assert preset.ip_adapter == presets[DEFAULT_VIDEO_PRESET].ip_adapter


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tiny:\n  base: tiny\n  sise: 64\n", "unknown keys ['sise']"),
        ("tiny: {base: tiny, size: big}\n", "`size` must be a positive integer"),
        ("tiny: [base, tiny\n", "not valid YAML"),
        ("- just a list\n", "expected a mapping"),
        ("x:\n  base: org/sd15\n  motion_adapter: org/adapter\n", "missing sparsectrl"),
        ("x:\n  size: 64\n", "needs a `base`"),
        (
            "x: {base: tiny, ip_adapter: {repo: org/ip, weight: a.safetensors}}\n",
            "unknown keys ['weight']",
        ),
    ],
)
def test_broken_preset_files_give_clear_errors(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "video_models.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(VideoPresetError) as info:
        load_video_presets(tmp_path)
    assert message in str(info.value)
    assert "video_models.yaml" in str(info.value)
    assert isinstance(info.value, ConfigFileError)  # the CLI reports these already


def test_missing_preset_file(tmp_path: Path) -> None:
    with pytest.raises(VideoPresetError, match="cannot read"):
        load_video_presets(tmp_path)


# ------------------------------------------------------------------------------ missing weights


def write_preset(folder: Path, ip_repo: str) -> Path:
    (folder / "video_models.yaml").write_text(
        "animatediff:\n"
        "  base: storycli-tests/no-such-sd15\n"
        "  motion_adapter: storycli-tests/no-such-motion-adapter\n"
        "  sparsectrl: storycli-tests/no-such-sparsectrl\n"
        f"  ip_adapter: {{repo: {ip_repo}, subfolder: models, weight_name: ip.safetensors}}\n"
        "  image_encoder: {repo: storycli-tests/no-such-encoder, subfolder: image_encoder}\n",
        encoding="utf-8",
    )
    return folder


def test_missing_local_base_folder(hub_offline: None, tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable) as info:
        load_animatediff_decoder("./no-such-sd15", device="cpu")
    message = str(info.value)
    assert "base model" in message and "no-such-sd15" in message and "hf download" in message


def test_uncached_ip_adapter(hub_offline: None, tmp_path: Path) -> None:
    configs = write_preset(tmp_path, "storycli-tests/no-such-ip-adapter")
    with pytest.raises(ModelUnavailable) as info:
        load_animatediff_decoder(device="cpu", configs_dir=configs)
    message = str(info.value)
    assert "IP-Adapter" in message
    assert "`hf download storycli-tests/no-such-ip-adapter models/ip.safetensors`" in message


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument")  # diffusers' call
def test_uncached_motion_adapter(hub_offline: None, tmp_path: Path) -> None:
    ip_file = tmp_path / "ip" / "models" / "ip.safetensors"
    ip_file.parent.mkdir(parents=True)
    ip_file.write_bytes(b"")  # only its presence is checked before the big downloads
    configs = write_preset(tmp_path, str(tmp_path / "ip"))
    with pytest.raises(ModelUnavailable) as info:
        load_animatediff_decoder(device="cpu", configs_dir=configs)
    message = str(info.value)
    assert "motion adapter" in message
    assert "`hf download storycli-tests/no-such-motion-adapter`" in message
    assert message.count(". ") == 0  # one sentence


# ---------------------------------------------------------------------------------- the stack


def test_tiny_stack_has_the_real_ip_adapter_objects(decoder: AnimateDiffDecoder) -> None:
    from diffusers import SparseControlNetModel, UNetMotionModel
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    unet = decoder.pipe.unet
    assert isinstance(unet, UNetMotionModel)
    assert isinstance(unet.encoder_hid_proj, MultiIPAdapterImageProjection)
    (projection,) = unet.encoder_hid_proj.image_projection_layers
    assert isinstance(projection, ImageProjection)
    assert projection.image_embeds.in_features == decoder.image_encoder.dim == EMBED_DIM
    cross = {n: p for n, p in unet.attn_processors.items() if n.endswith("attn2.processor")}
    spatial = [p for n, p in cross.items() if "motion_modules" not in n]
    assert spatial and all(isinstance(p, IPAdapterAttnProcessor2_0) for p in spatial)
    controlnet = decoder.pipe.controlnet
    assert isinstance(controlnet, SparseControlNetModel)
    assert controlnet.config.use_simplified_condition_embedding
    assert controlnet.config.conditioning_channels == 4


def test_render_size_keeps_aspect_and_multiples() -> None:
    assert render_size((1024, 768), 512, 8) == (512, 384)
    assert render_size((1344, 768), 512, 8) == (512, 296)
    assert render_size((48, 64), 64, 8) == (48, 64)


# ------------------------------------------------------------------------------- transitions


@pytest.mark.parametrize("size", [(64, 64), (64, 48), (70, 50)])
def test_frames_have_the_requested_count_and_size(
    decoder: AnimateDiffDecoder, size: tuple[int, int]
) -> None:
    frames = decoder.transition(request(size))
    assert len(frames) == FRAMES
    assert all(frame.size == size and frame.mode == "RGB" for frame in frames)


def test_image_space_sparsectrl_sizes_latents_from_the_keyframes() -> None:
    """The scribble layout: SparseCtrl conditioning in pixel space, not VAE latents."""
    from storycli.motion.decoders.animatediff_tiny import build_tiny_animatediff_stack
    from storycli.weights.image_encoder import ImageEncoder

    pipe = build_tiny_animatediff_stack(image_condition=True)
    controlnet = pipe.controlnet
    assert not controlnet.config.use_simplified_condition_embedding
    assert controlnet.config.conditioning_channels == 3
    preset = resolve_video_preset("tiny", load_video_presets())
    pipe.set_ip_adapter_scale(preset.ip_scale)
    encoder = ImageEncoder(pipe.image_encoder, pipe.feature_extractor, "tiny", "cpu", torch.float32)
    image_space = AnimateDiffDecoder(pipe, encoder, preset)
    size = (64, 48)  # not square: width and height must not be swapped either
    frames = image_space.transition(request(size))
    assert len(frames) == FRAMES
    assert all(frame.size == size and frame.mode == "RGB" for frame in frames)


def test_same_seed_same_frames(decoder: AnimateDiffDecoder, reference: list) -> None:
    again = decoder.transition(request())
    assert np.array_equal(pixels(again), pixels(reference))
    other = decoder.transition(request(seed=8))
    assert per_frame_change(other, reference).mean() > 1.0


def test_each_frame_gets_its_own_embedding(decoder: AnimateDiffDecoder, reference: list) -> None:
    i = 3
    changed = embeddings()
    changed[i] = torch.randn(EMBED_DIM, generator=torch.Generator().manual_seed(99)) * 3
    frames = decoder.transition(request(embeddings=changed))
    change = per_frame_change(frames, reference)
    assert change[i] > 1.0
    # Frame i's own tokens changed; the others only feel it through temporal attention.
    assert change.argmax() == i
    assert change[i] > 2 * max(change[0], change[-1])
    # Same call with the original embeddings: the original frames, exactly.
    assert np.array_equal(pixels(decoder.transition(request())), pixels(reference))


def test_per_frame_text_follows_the_end_prompt(
    decoder: AnimateDiffDecoder, reference: list
) -> None:
    frames = decoder.transition(request(end_prompt="a small boat on a stormy sea"))
    change = per_frame_change(frames, reference)
    assert change.mean() > 0.1
    # The text lerp gives the last frame the new prompt fully and the first one not at all.
    assert change[-1] > change[0]


def test_no_embeddings_means_the_lerp_baseline(decoder: AnimateDiffDecoder) -> None:
    plain = request(embeddings=None)
    baseline = decoder.lerp_embeddings(plain)
    assert baseline.shape == (FRAMES, EMBED_DIM)
    ends = decoder.image_encoder.encode([plain.start, plain.end])
    assert torch.allclose(baseline[0], ends[0]) and torch.allclose(baseline[-1], ends[1])
    frames = decoder.transition(plain)
    explicit = decoder.transition(request(embeddings=baseline))
    assert np.array_equal(pixels(frames), pixels(explicit))


def test_projection_is_restored_after_a_call_and_after_an_error(
    decoder: AnimateDiffDecoder, reference: list
) -> None:
    unet = decoder.pipe.unet
    projection = unet.encoder_hid_proj
    steps: list[tuple[int, int]] = []
    decoder.transition(request(), on_step=lambda done, total: steps.append((done, total)))
    assert steps == [(1, 2), (2, 2)]
    assert unet.encoder_hid_proj is projection

    def fail(done: int, total: int) -> None:
        assert unet.encoder_hid_proj is None  # detached during the call
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        decoder.transition(request(), on_step=fail)
    assert unet.encoder_hid_proj is projection


def test_bad_requests_are_refused(decoder: AnimateDiffDecoder) -> None:
    with pytest.raises(ValueError, match="shape"):
        decoder.transition(request(embeddings=torch.zeros(FRAMES, EMBED_DIM + 1)))
    with pytest.raises(ValueError, match="frames"):
        decoder.transition(request(frames=1, embeddings=torch.zeros(1, EMBED_DIM)))


def test_lerp_frames_endpoints() -> None:
    a, b = torch.zeros(3), torch.ones(3)
    out = lerp_frames(a, b, 5)
    assert out.shape == (5, 3)
    assert torch.equal(out[0], a) and torch.equal(out[-1], b)
    assert torch.allclose(out[2], torch.full((3,), 0.5))


# ------------------------------------------------------------ the real stack's hub layouts


def _save_tiny_stack_repos(root: Path) -> dict[str, Path]:
    """The default preset's five repos as tiny random ones, in the real repos' layouts: an SD1.5
    pipeline folder (fp16 files only, as `hf download --include "*fp16*"` leaves), a motion
    adapter, a SparseCtrl model, and h94/IP-Adapter's models/ip-adapter_sd15.safetensors (the
    original flat key format) next to models/image_encoder/."""
    from diffusers import StableDiffusionPipeline, UNetMotionModel
    from hub_repos import quiet_save, save_tiny_ip_adapter_repo
    from safetensors.torch import save_file

    from storycli.motion.decoders import animatediff_tiny as tiny_video
    from storycli.weights.tiny import build_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        tokenizer = build_tokenizer()
        unet = tiny_video._tiny_unet()
        adapter = tiny_video._tiny_motion_adapter()
        controlnet = tiny_video._tiny_sparsectrl()
        tiny_video._wake_zero_layers(controlnet)
        base = StableDiffusionPipeline(
            vae=tiny_video._tiny_vae(),
            text_encoder=tiny_video._tiny_text_encoder(tokenizer),
            tokenizer=tokenizer,
            unet=unet,
            scheduler=tiny_video._tiny_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        with tiny_video.quiet_diffusers_models():
            motion_unet = UNetMotionModel.from_unet2d(unet, adapter)
        ip = tiny_video.ip_adapter_state_dict(motion_unet, EMBED_DIM)
    repos = {
        "stable-diffusion-v1-5/stable-diffusion-v1-5": root / "sd15",
        "guoyww/animatediff-motion-adapter-v1-5-3": root / "motion",
        "guoyww/animatediff-sparsectrl-rgb": root / "sparsectrl",
        "h94/IP-Adapter": root / "ip-adapter",
    }
    torch.nn.Module.to(base.unet, torch.float16)
    base.to(torch.float16)
    quiet_save(base, repos["stable-diffusion-v1-5/stable-diffusion-v1-5"], variant="fp16")
    quiet_save(adapter, repos["guoyww/animatediff-motion-adapter-v1-5-3"])
    quiet_save(controlnet, repos["guoyww/animatediff-sparsectrl-rgb"])
    save_tiny_ip_adapter_repo(repos["h94/IP-Adapter"])
    flat = {f"{part}.{k}": v.contiguous() for part, d in ip.items() for k, v in d.items()}
    save_file(flat, str(repos["h94/IP-Adapter"] / "models" / "ip-adapter_sd15.safetensors"))
    return repos


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument")  # diffusers' call
def test_default_stack_loads_from_hub_layouts_offline(hub_offline: None, tmp_path: Path) -> None:
    import huggingface_hub.constants
    import yaml
    from hub_repos import hub_repo

    cache = Path(huggingface_hub.constants.HF_HUB_CACHE)
    commits = {}
    for i, (repo, folder) in enumerate(_save_tiny_stack_repos(tmp_path / "repos").items()):
        commits[repo] = f"{i + 1}" * 40
        hub_repo(cache, repo, folder, commit=commits[repo])
    # The default preset's components, at the tiny stack's size and one step.
    presets = load_video_presets()
    configs = tmp_path / "configs"
    configs.mkdir()
    entry = dataclasses.asdict(presets[DEFAULT_VIDEO_PRESET]) | {"size": 64, "steps": 1}
    entry.pop("name")
    (configs / "video_models.yaml").write_text(
        yaml.safe_dump({DEFAULT_VIDEO_PRESET: entry}), encoding="utf-8"
    )
    decoder = load_animatediff_decoder(device="cpu", configs_dir=configs)
    described = decoder.describe()
    assert described["image_encoder"] == "openclip-vit-h"
    sources = {
        "base": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "motion_adapter": "guoyww/animatediff-motion-adapter-v1-5-3",
        "sparsectrl": "guoyww/animatediff-sparsectrl-rgb",
        "ip_adapter": "h94/IP-Adapter",
        "image_encoder": "h94/IP-Adapter",
    }
    assert {k: described[f"{k}_revision"] for k in sources} == {
        k: commits[repo] for k, repo in sources.items()
    }
    assert decoder.pipe.unet.dtype == torch.float32  # fp16 files, loaded for the CPU
    frames = decoder.transition(request())
    assert len(frames) == FRAMES and frames[0].size == (64, 64)


def test_tiny_stack_describes_no_hub_revisions(decoder: AnimateDiffDecoder) -> None:
    described = decoder.describe()
    revisions = [k for k in described if k.endswith("_revision")]
    assert len(revisions) == 5 and all(described[k] is None for k in revisions)
