"""FLUX.1 on the story and plan side: presets' story defaults, the family known before loading,
the T5 prompt budget and the refusals `validate` / `--dry-run` report. Pure Python, no torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from storycli.cli import app
from storycli.config import ConfigFileError, Configs, default_configs_dir
from storycli.keyframes.plan import build_plan
from storycli.story.family import folder_family, story_family
from storycli.story.loader import StoryError, load_story
from storycli.weights.tiny_words import TINY_T5_LENGTH, t5_unigram

LONG = (
    "walks in the forest under the moon with her dog and her cat and a big red bird, looking "
    "at the stars and the clouds over the mountains and the river, a lamp in her hand, a map "
    "in her other hand, a golden crown on her hair, a cloak over her dress"
)


def write(folder: Path, text: str, name: str = "story.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def flux(folder: Path, model: str = "tiny-flux", extra: str = "", frame: str = "runs") -> Path:
    return write(
        folder,
        f"""\
        model: {model}
        identity: a girl with a red scarf
        consistency: {{method: none}}
        {extra}
        frames:
          - "{frame}"
        """,
    )


def configs_with(tmp_path: Path, presets: dict) -> Configs:
    """The shipped configs, with `presets` added to models.yaml."""
    root = tmp_path / "configs"
    shutil.copytree(default_configs_dir(), root)
    models = yaml.safe_load((root / "models.yaml").read_text()) | presets
    (root / "models.yaml").write_text(yaml.safe_dump(models))
    return Configs(root)


# --------------------------------------------------------------------------------------------------
# Preset defaults


@pytest.mark.parametrize(
    ("model", "steps", "guidance"), [("flux-dev", 28, 3.5), ("flux-schnell", 4, 0.0)]
)
def test_preset_defaults_apply_when_the_story_leaves_the_key_out(
    tmp_path: Path, model: str, steps: int, guidance: float
) -> None:
    story = load_story(flux(tmp_path, model))
    assert (story.steps, story.guidance) == (steps, guidance)


def test_the_storys_own_value_wins_over_the_presets(tmp_path: Path) -> None:
    story = load_story(flux(tmp_path, "flux-dev", "steps: 10"))
    assert (story.steps, story.guidance) == (10, 3.5)


def test_preset_defaults_follow_the_model_the_command_line_names(tmp_path: Path) -> None:
    path = flux(tmp_path, "sdxl")
    assert load_story(path).steps == 30  # defaults.yaml's
    assert load_story(path, overrides={"model": "flux-schnell"}).steps == 4


def test_sdxl_presets_keep_defaults_yaml(tmp_path: Path) -> None:
    for model in ("sdxl", "tiny", "tiny-flux"):
        story = load_story(flux(tmp_path, model))
        assert (story.steps, story.guidance, story.scheduler) == (30, 5.0, "dpmpp-2m-karras")


def test_preset_defaults_merge_into_nested_settings(tmp_path: Path) -> None:
    configs = configs_with(
        tmp_path,
        {"mine": {"source": "tiny", "family": "sdxl", "defaults": {"consistency": {"sa32": 0.2}}}},
    )
    path = write(tmp_path, 'model: mine\nidentity: a girl\nframes: ["runs", "sits", "reads"]\n')
    story = load_story(path, configs)
    assert story.consistency.sa32 == 0.2 and story.consistency.sa64 == 0.5


@pytest.mark.parametrize(
    ("defaults", "message"),
    [
        ({"stepz": 4}, "defaults.stepz: unknown key"),
        ({"steps": 0}, "defaults.steps: must be greater than or equal to 1"),
        ({"consistency": {"sa33": 0.1}}, "defaults.consistency.sa33: unknown key"),
        ({"frames": ["x"]}, "defaults.frames: a preset's defaults hold settings"),
        ({"model": "sdxl"}, "defaults.model: a preset's defaults hold settings"),
    ],
)
def test_preset_defaults_are_checked_as_a_storys_keys(
    tmp_path: Path, defaults: dict, message: str
) -> None:
    configs = configs_with(tmp_path, {"bad": {"source": "tiny", "defaults": defaults}})
    with pytest.raises(StoryError) as error:
        load_story(flux(tmp_path, "bad"), configs)
    assert "configuration problem" in str(error.value)
    assert f"preset 'bad' {message}" in str(error.value)


@pytest.mark.parametrize("tokens", [1, 513, "256", True])
def test_t5_tokens_out_of_range_is_a_configuration_error(tmp_path: Path, tokens: object) -> None:
    configs = configs_with(tmp_path, {"odd": {"source": "tiny-flux", "t5_tokens": tokens}})
    with pytest.raises(ConfigFileError, match="preset 'odd': `t5_tokens` must be a whole number"):
        _ = configs.presets


def test_a_presets_t5_tokens_is_the_budget_the_plan_counts_with(tmp_path: Path) -> None:
    assert Configs().presets["flux-schnell"].t5_tokens == 256
    assert Configs().presets["flux-dev"].t5_tokens is None  # the tokenizer's 512
    configs = configs_with(
        tmp_path, {"short-flux": {"source": "tiny-flux", "family": "flux", "t5_tokens": 8}}
    )
    story = load_story(flux(tmp_path, "short-flux", frame="runs in the forest"), configs)
    plan = build_plan(story, configs)
    assert plan.t5_tokens == 8
    [warning] = plan.warnings
    assert "over FLUX.1's T5 budget of 8" in warning.message
    # Over the tokenizer's own length, the tokenizer's (tiny: 64) stays the budget.
    roomy = configs_with(
        tmp_path / "b", {"roomy": {"source": "tiny-flux", "family": "flux", "t5_tokens": 500}}
    )
    plan = build_plan(load_story(flux(tmp_path, "roomy", frame=LONG), roomy), roomy)
    assert f"budget of {TINY_T5_LENGTH}:" in plan.warnings[0].message


def test_an_unknown_family_is_a_configuration_error(tmp_path: Path) -> None:
    configs = configs_with(tmp_path, {"odd": {"source": "tiny", "family": "unet"}})
    with pytest.raises(ConfigFileError, match="family 'unet'"):
        _ = configs.presets


# --------------------------------------------------------------------------------------------------
# The family before loading


def flux_folder(root: Path, max_length: int | None = None, tokenizer: bool = True) -> Path:
    """A FLUX.1 diffusers folder as far as planning reads it: model_index.json and T5's
    tokenizer (the tiny one)."""
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    if tokenizer:
        (root / "tokenizer_2").mkdir()
        t5_unigram().save(str(root / "tokenizer_2" / "tokenizer.json"))
        if max_length is not None:
            config = {"model_max_length": max_length}
            (root / "tokenizer_2" / "tokenizer_config.json").write_text(json.dumps(config))
    return root


@pytest.mark.usefixtures("hub_offline")
def test_family_from_preset_folder_or_nothing(tmp_path: Path) -> None:
    configs = Configs()
    assert story_family("flux-dev", configs, tmp_path) == "flux"  # its preset, not cached
    assert story_family("sdxl", configs, tmp_path) == "sdxl"
    assert story_family("tiny-flux", configs, tmp_path) == "flux"
    flux_folder(tmp_path / "f")
    assert story_family("./f", configs, tmp_path) == "flux"
    assert story_family("org/not-cached", configs, tmp_path) is None
    assert folder_family("tiny") == "sdxl"


def test_models_asks_the_same_family_lookup() -> None:
    from storycli.keyframes import models
    from storycli.story import family

    assert models.index_family is family.index_family
    assert models.TINY_SOURCES is family.TINY_SOURCES


# --------------------------------------------------------------------------------------------------
# The T5 budget


def test_flux_prompts_are_not_trimmed_and_counted_in_t5_tokens(tmp_path: Path) -> None:
    plan = build_plan(load_story(flux(tmp_path, frame=LONG)))
    assert plan.family == "flux"
    assert plan.frames[0].prompt == f"a girl with a red scarf, {LONG}"  # whole, past 77 CLIP
    [warning] = plan.warnings
    assert warning.loc == ("frames", 0)
    tokens = len(t5_unigram().encode(plan.frames[0].prompt).ids)
    assert warning.message.startswith(
        f"prompt is {tokens} T5 tokens, over FLUX.1's T5 budget of {TINY_T5_LENGTH}: T5 drops "
    )
    assert "text encoder's 77" not in warning.message


def test_a_flux_prompt_within_the_t5_budget_gives_no_warning(tmp_path: Path) -> None:
    plan = build_plan(load_story(flux(tmp_path, frame="runs in the forest")))
    assert plan.warnings == ()


@pytest.mark.usefixtures("hub_offline")
def test_a_flux_folder_counts_with_its_own_t5_tokenizer(tmp_path: Path) -> None:
    flux_folder(tmp_path / "f", max_length=8)
    plan = build_plan(load_story(flux(tmp_path, "./f", frame="runs in the forest")), None, tmp_path)
    [warning] = plan.warnings
    assert "over FLUX.1's T5 budget of 8" in warning.message


@pytest.mark.usefixtures("hub_offline")
def test_without_a_t5_tokenizer_the_count_is_skipped_with_a_warning(tmp_path: Path) -> None:
    flux_folder(tmp_path / "f", tokenizer=False)
    plan = build_plan(load_story(flux(tmp_path, "./f", frame=LONG)), None, tmp_path)
    assert plan.frames[0].prompt.endswith(LONG)
    [warning] = plan.warnings
    assert warning.loc == ("model",) and "T5 count is skipped" in warning.message


@pytest.mark.usefixtures("hub_offline")
def test_a_hub_id_not_cached_plans_as_before(tmp_path: Path) -> None:
    story = load_story(flux(tmp_path, "org/some-model", frame=f"{LONG}, {LONG}"))
    plan = build_plan(story, None, tmp_path)
    assert plan.family is None
    assert "text encoder's 77" in plan.warnings[0].message  # trimmed to CLIP, as SDXL


# --------------------------------------------------------------------------------------------------
# Refusals before loading


def test_validate_refuses_ip_adapter_on_tiny_flux_without_torch(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "face.png")
    path = flux(tmp_path, extra="ip_adapter: {image: face.png, model: tiny}")
    code = (
        "import sys\n"
        "from storycli.story.loader import StoryError, load_story\n"
        "try:\n"
        f"    load_story({str(path)!r})\n"
        "except StoryError as exc:\n"
        "    print(exc)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    refusal, modules = proc.stdout.strip().splitlines()
    assert " ip_adapter: IP-Adapter photos are not supported on FLUX.1 yet" in refusal
    assert modules == "[]"
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "ip_adapter: IP-Adapter photos" in errors[0]


def test_validate_reports_each_refusal_in_one_line(tmp_path: Path) -> None:
    extra = "freeu: {s1: 0.6, s2: 0.4, b1: 1.1, b2: 1.2}"
    path = flux(tmp_path, "flux-schnell", extra)
    with pytest.raises(StoryError) as error:
        load_story(path)
    assert [issue.field for issue in error.value.issues] == ["freeu"]


def test_dry_run_accepts_compile_on_a_flux_preset(tmp_path: Path) -> None:
    # `--compile` runs on FLUX.1 (`tests/keyframes/test_flux_compile.py`): nothing refused.
    path = flux(tmp_path)
    result = CliRunner().invoke(app, ["generate", str(path), "--dry-run", "--compile"])
    assert result.exit_code == 0, result.output
    assert "not supported" not in result.output


# --------------------------------------------------------------------------------------------------
# Which blocks take CSA


def with_blocks(folder: Path, model: str, blocks: str) -> Path:
    return write(
        folder,
        f"""\
        model: {model}
        identity: a girl with a red scarf
        consistency: {{method: storydiffusion, id_length: 1, blocks: {blocks}}}
        frames: ["runs", "sits"]
        """,
    )


@pytest.mark.parametrize("blocks", ["[single.20-37, double.0]", "[up, double]", "[single.5]"])
def test_flux_stories_name_transformer_blocks(tmp_path: Path, blocks: str) -> None:
    story = load_story(with_blocks(tmp_path, "flux-schnell", blocks))
    assert list(story.consistency.blocks) == yaml.safe_load(blocks)


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ("[single.7-3]", "block range 'single.7-3' goes down: write the lower index first"),
        ("[triple]", "unknown block 'triple': use down, mid, up or, on FLUX.1, double, single"),
        ("[single.-1]", "unknown block 'single.-1'"),
        ("[up, up]", "list each block at most once"),
    ],
)
def test_bad_block_names_are_refused(tmp_path: Path, blocks: str, message: str) -> None:
    with pytest.raises(StoryError) as error:
        load_story(with_blocks(tmp_path, "flux-schnell", blocks))
    assert message in str(error.value)


def test_sdxl_refuses_transformer_block_names_in_one_line(tmp_path: Path) -> None:
    path = with_blocks(tmp_path, "tiny", "[up, single.20-37]")
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert (
        "consistency.blocks: single.20-37 names FLUX.1 transformer blocks; SDXL's UNet"
        in (lines[0])
    )
