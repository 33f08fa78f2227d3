"""Which model family (backbone) a story's `model:` names, known without loading anything, and
what FLUX.1 cannot run yet.

The family comes from a preset's `family:`, a built-in tiny model, or the `model_index.json` of a
local diffusers folder or of a hub id's cached snapshot; a hub id not cached yet is known only
once loaded (None here). Pure Python: no torch, no diffusers, so `validate` and `--dry-run`
refuse what a family cannot run before any weights load; `keyframes.models` asks the same.
"""

from __future__ import annotations

import json
from pathlib import Path

from storycli.config import Configs
from storycli.story.checks import local_model_path
from storycli.story.schema import Loc, Story

#: Built in-process (`weights.tiny`, `weights.tiny_flux`), by family.
TINY_SOURCES = {"tiny": "sdxl", "tiny-flux": "flux"}
#: `model_index.json`'s `_class_name` → family (anything else loads as SDXL, as before).
PIPELINE_FAMILIES = {"FluxPipeline": "flux"}


def cached_snapshot(repo_id: str) -> Path | None:
    """The folder of `repo_id`'s cached snapshot (the commit refs/main names), or None."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    try:
        commit = (storage / "refs" / "main").read_text().strip()
    except OSError:
        return None
    folder = storage / "snapshots" / commit
    return folder if commit and folder.is_dir() else None


def index_family(model_index: Path) -> str:
    """The family a diffusers folder's `model_index.json` names ("sdxl" unless FLUX)."""
    try:
        name = json.loads(model_index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return "sdxl"  # the load itself says what is wrong with the folder
    return PIPELINE_FAMILIES.get(str(name), "sdxl")


def source_folder(source: str) -> Path | None:
    """The diffusers folder a resolved source (absolute path or hub id) is read from without
    loading: the folder itself, or a hub id's cached snapshot; None for files, tiny models
    and hub ids not cached."""
    if source in TINY_SOURCES:
        return None
    path = Path(source)
    if path.is_absolute():
        return path if path.is_dir() else None
    return cached_snapshot(source)


def folder_family(source: str) -> str | None:
    """ "sdxl" or "flux" for a resolved source (tiny model, absolute folder or hub id) without
    loading it; None for a single file (its header tells, see `keyframes.models`) and a hub id
    whose snapshot is not cached (the load finds out)."""
    if source in TINY_SOURCES:
        return TINY_SOURCES[source]
    folder = source_folder(source)
    if folder is None or not (folder / "model_index.json").is_file():
        # A local folder without model_index.json is refused by `check_model`.
        return "sdxl" if Path(source).is_absolute() and folder is not None else None
    return index_family(folder / "model_index.json")


def model_source(model: str, configs: Configs, base_dir: Path) -> str:
    """What a `model:` value loads: a preset's source, a local path made absolute, else the
    value (a hub id)."""
    preset = configs.presets.get(model)
    if preset is not None:
        return preset.source
    local = local_model_path(model, base_dir)
    return str(local.resolve()) if local is not None else model


def story_family(model: str, configs: Configs, base_dir: Path) -> str | None:
    """The family of a story's `model:` (a preset's `family:` first), or None when it is
    known only once loaded."""
    preset = configs.presets.get(model)
    if preset is not None and preset.family is not None:
        return preset.family
    return folder_family(model_source(model, configs, base_dir))


_SDXL_INSTEAD = "or use an SDXL model (e.g. `model: sdxl`)"


def flux_refusals(story: Story) -> list[tuple[Loc, str]]:
    """The story's features FLUX.1 cannot run yet, each as (field, message with the fix)."""
    out: list[tuple[Loc, str]] = []
    for owner, _ in story.photos()[:1]:  # one line: the first photo names the feature
        at: Loc = ("ip_adapter",) if owner is None else ("characters", owner, "ip_adapter")
        out.append(
            (
                at,
                "IP-Adapter photos are not supported on FLUX.1 yet; remove `ip_adapter:` "
                + _SDXL_INSTEAD,
            )
        )
    if story.uses_one_prompt:
        out.append(
            (
                ("consistency", "method"),
                "one-prompt (1Prompt1Story) is not supported on FLUX.1 yet; use `method: none` "
                + _SDXL_INSTEAD,
            )
        )
    if story.freeu is not None:
        out.append(
            (("freeu",), "FreeU is a UNet feature, not FLUX.1's; remove `freeu:` from the story")
        )
    return out


def sdxl_refusals(story: Story) -> list[tuple[Loc, str]]:
    """The story's settings only FLUX.1 has: its transformer block names in `blocks`."""
    from storycli.story.schema import UNET_BLOCKS

    dit = [b for b in story.consistency.blocks if b not in UNET_BLOCKS]
    if not dit:
        return []
    return [
        (
            ("consistency", "blocks"),
            f"{', '.join(dit)} {'names' if len(dit) == 1 else 'name'} FLUX.1 transformer "
            f"blocks; SDXL's UNet takes {', '.join(UNET_BLOCKS)}",
        )
    ]


def family_refusals(family: str | None, story: Story) -> list[tuple[Loc, str]]:
    """What a model `family` cannot run of `story` (an unknown family: nothing yet)."""
    if family == "flux":
        return flux_refusals(story)
    return sdxl_refusals(story) if family == "sdxl" else []
