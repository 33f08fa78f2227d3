"""Tests for the prompt grammar and the generation plan (storycli.keyframes.plan). Pure Python,
no torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from storycli.cli import app
from storycli.config import Configs
from storycli.keyframes.plan import Plan, PlanWarning, build_plan
from storycli.seeds import derive_seed
from storycli.story.loader import load_story
from storycli.story.schema import Story
from storycli.story.tokens import count_tokens, quote

REPO = Path(__file__).resolve().parents[2]
MODEL = {"source": "tiny", "variant": None}

MARA = "a girl with curly black hair"
OLLIE = "a small grey cat"

# Two characters, Ollie shown first but Mara defined first; a two-character frame before
# Mara's second solo frame; an [NC] frame.
TWO = f"""\
name: two
model: tiny
characters:
  Mara: {MARA}
  Ollie: {OLLIE}
consistency:
  method: storydiffusion
  id_length: 2
seed: 11
frames:
  - "[Ollie] sleeps on a windowsill #Zzz"
  - "[Mara] waves at the gate #Bye!"
  - "[Mara] and [Ollie] share a sandwich"
  - "[NC] a busy market square #Market day."
  - "[Mara] buys sunflowers"
  - "[Ollie] chases a butterfly"
  - "[Mara] walks home"
  - "[Ollie] and [Mara] watch the sunset"
"""


def write(folder: Path, text: str, name: str = "story.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def story_of(folder: Path, text: str, name: str = "story.yaml") -> Story:
    return load_story(write(folder, text, name))


def plan_of(folder: Path, text: str, name: str = "story.yaml") -> Plan:
    return build_plan(story_of(folder, text, name))


def identity_story(frames: list[str], extra: str = "") -> str:
    lines = "\n".join(f"  - {json.dumps(f)}" for f in frames)
    return (
        "identity: a fox with a blue scarf\nmodel: tiny\nconsistency: {method: none}\n"
        f"frames:\n{lines}\n{extra}"
    )


# --------------------------------------------------------------------------------------------------
# Frame grammar


@pytest.mark.parametrize(
    ("written", "prompt", "caption"),
    [
        ("runs through the snow #Cold!", "runs through the snow", "Cold!"),
        ("runs   #   Cold!  ", "runs", "Cold!"),
        ("wears a #1 shirt #Number one", "wears a #1 shirt", "Number one"),
        ("runs through the snow", "runs through the snow", None),
        ("  runs through the snow  ", "runs through the snow", None),
        ("runs through the snow #", "runs through the snow", None),
        ("runs through the snow #   ", "runs through the snow", None),
    ],
    ids=["simple", "spaces", "last-hash", "no-hash", "no-hash-strip", "empty", "blank"],
)
def test_prompt_caption_shorthand(tmp_path: Path, written: str, prompt: str, caption: str | None):
    frame = story_of(tmp_path, identity_story([written])).frames[0]
    assert frame.prompt == prompt
    assert frame.caption == caption


def test_object_form(tmp_path: Path) -> None:
    text = """\
    identity: a fox
    model: tiny
    consistency: {method: none}
    frames:
      - prompt: "wears a #1 shirt"
        caption: "Number #1"
      - prompt: sleeps
    """
    story = story_of(tmp_path, text)
    # the object form is taken literally: no '#' parsing
    assert (story.frames[0].prompt, story.frames[0].caption) == ("wears a #1 shirt", "Number #1")
    assert (story.frames[1].prompt, story.frames[1].caption) == ("sleeps", None)
    plan = build_plan(story)
    assert plan.frames[0].caption == "Number #1"
    assert plan.frames[0].source == "wears a #1 shirt"


def test_identity_form_prefixes_identity(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, identity_story(["runs through the snow #Cold", "[NC] a dark forest"]))
    first, second = plan.frames
    assert first.prompt == "a fox with a blue scarf, runs through the snow"
    assert first.characters == ("identity",)
    assert first.caption == "Cold"
    # [NC]: no identity, no characters
    assert second.prompt == "a dark forest"
    assert second.characters == ()
    assert second.role == "plain"


def test_identity_form_references_are_first_frames_without_nc(tmp_path: Path) -> None:
    text = identity_story(["[NC] a sea", "a", "b", "[NC] c", "d", "e"]).replace(
        "{method: none}", "{id_length: 3}"
    )
    plan = plan_of(tmp_path, text)
    assert plan.references == {"identity": (1, 2, 4)}
    assert [f.role for f in plan.frames] == [
        "plain",
        "reference",
        "reference",
        "plain",
        "reference",
        "read",
    ]


def test_character_tags_are_replaced_by_descriptions(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, TWO)
    by_index = {f.index: f for f in plan.frames}
    assert by_index[0].prompt == f"{OLLIE} sleeps on a windowsill"
    assert by_index[1].prompt == f"{MARA} waves at the gate"
    assert by_index[2].prompt == f"{MARA} and {OLLIE} share a sandwich"
    assert "[" not in "".join(f.prompt for f in plan.frames)
    assert by_index[0].source == "[Ollie] sleeps on a windowsill"


def test_nc_is_removed_and_frame_has_no_characters(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, TWO)
    nc = plan.frames[3]
    assert nc.prompt == "a busy market square"
    assert nc.characters == ()
    assert nc.role == "plain"
    assert nc.reference_of is None
    assert nc.caption == "Market day."


def test_tags_with_spaces_and_punctuation_cleanup(tmp_path: Path) -> None:
    text = """\
    characters:
      Mara: a girl
    model: tiny
    consistency: {method: none}
    frames:
      - "[ Mara ] , runs"
      - "[NC], an empty street ."
    """
    plan = plan_of(tmp_path, text)
    assert plan.frames[0].prompt == "a girl, runs"
    assert plan.frames[0].characters == ("Mara",)
    assert plan.frames[1].prompt == "an empty street."


def test_two_character_frames_list_both_in_definition_order_and_read(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, TWO)
    for index in (2, 7):  # "[Mara] and [Ollie]" and "[Ollie] and [Mara]"
        frame = plan.frames[index]
        assert frame.characters == ("Mara", "Ollie")
        assert frame.role == "read"
        assert frame.reference_of is None


def test_references_are_first_solo_frames(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, TWO)
    # frame 2 (two tags) does not count for either character
    assert plan.references == {"Mara": (1, 4), "Ollie": (0, 5)}
    assert list(plan.references) == ["Mara", "Ollie"]  # definition order
    roles = {f.index: (f.role, f.reference_of) for f in plan.frames}
    assert roles == {
        0: ("reference", "Ollie"),
        1: ("reference", "Mara"),
        2: ("read", None),
        3: ("plain", None),
        4: ("reference", "Mara"),
        5: ("reference", "Ollie"),
        6: ("read", None),
        7: ("read", None),
    }


def test_call_order(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, TWO)
    calls = [(c.phase, c.character, c.frames) for c in plan.calls]
    assert calls == [
        ("write", "Mara", (1, 4)),
        ("write", "Ollie", (0, 5)),
        ("read", None, (2,)),
        ("plain", None, (3,)),
        ("read", None, (6,)),
        ("read", None, (7,)),
    ]
    # every frame is generated exactly once
    assert sorted(i for c in plan.calls for i in c.frames) == list(range(len(plan.frames)))
    # each call's CSA seed is its own and reproducible
    assert len({c.csa_seed for c in plan.calls}) == len(plan.calls)
    assert [c.csa_seed for c in plan_of(tmp_path, TWO).calls] == [c.csa_seed for c in plan.calls]


def test_consistency_none_keeps_batches_but_no_references(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, TWO.replace("method: storydiffusion", "method: none"))
    assert plan.references == {}
    assert {f.role for f in plan.frames} == {"plain"}
    assert all(f.reference_of is None for f in plan.frames)
    calls = [(c.phase, c.character, c.frames) for c in plan.calls]
    assert calls == [
        ("plain", "Mara", (1, 4)),
        ("plain", "Ollie", (0, 5)),
        ("plain", None, (2,)),
        ("plain", None, (3,)),
        ("plain", None, (6,)),
        ("plain", None, (7,)),
    ]
    # prompts and characters do not depend on the attention method
    with_csa = plan_of(tmp_path, TWO, name="with.yaml")
    assert [f.prompt for f in plan.frames] == [f.prompt for f in with_csa.frames]
    assert [f.characters for f in plan.frames] == [f.characters for f in with_csa.frames]


def test_characters_with_fewer_solo_frames_than_id_length_without_consistency(
    tmp_path: Path,
) -> None:
    text = TWO.replace("method: storydiffusion", "method: none").replace(
        "id_length: 2", "id_length: 5"
    )
    plan = plan_of(tmp_path, text)
    assert [(c.character, c.frames) for c in plan.calls[:2]] == [
        ("Mara", (1, 4, 6)),
        ("Ollie", (0, 5)),
    ]


# --------------------------------------------------------------------------------------------------
# Style, negative, seeds, files


def test_style_template_and_negative(tmp_path: Path) -> None:
    styles = Configs().styles
    comic = styles["comic"]
    plan = plan_of(
        tmp_path, identity_story(["runs"], 'style: comic\nnegative: "text, watermark"\n')
    )
    frame = plan.frames[0]
    assert frame.prompt == comic.prompt.replace("{prompt}", "a fox with a blue scarf, runs")
    assert frame.prompt.startswith("comic book panel, a fox with a blue scarf, runs, bold ink")
    assert frame.negative == f"{comic.negative}, text, watermark"


@pytest.mark.parametrize(
    ("extra", "negative"),
    [
        ("", ""),
        ('negative: "blurry"\n', "blurry"),
        ('style: none\nnegative: "blurry"\n', "blurry"),
        ("style: anime\n", "photo, photorealistic, realism, ugly, deformed, lowres"),
        (
            "style: anime\nnegative: '  '\n",
            "photo, photorealistic, realism, ugly, deformed, lowres",
        ),
    ],
    ids=["nothing", "story-only", "style-none", "style-only", "blank-story-negative"],
)
def test_negative_joining(tmp_path: Path, extra: str, negative: str) -> None:
    plan = plan_of(tmp_path, identity_story(["runs"], extra))
    assert plan.frames[0].negative == negative


def test_style_none_leaves_prompt_alone(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, identity_story(["runs"], "style: none\n"))
    assert plan.frames[0].prompt == "a fox with a blue scarf, runs"


def test_noise_shared_and_per_frame(tmp_path: Path) -> None:
    frames = ["a", "b", "c", "d"]
    shared = plan_of(tmp_path, identity_story(frames, "seed: 42\nnoise: shared\n"), "s.yaml")
    assert [f.seed for f in shared.frames] == [42] * 4
    per_frame = plan_of(tmp_path, identity_story(frames, "seed: 42\nnoise: per-frame\n"), "p.yaml")
    assert [f.seed for f in per_frame.frames] == [42, 43, 44, 45]


@pytest.mark.parametrize(
    ("count", "first", "last"),
    [
        (1, "frame_01.png", "frame_01.png"),
        (9, "frame_01.png", "frame_09.png"),
        (99, "frame_01.png", "frame_99.png"),
        (100, "frame_001.png", "frame_100.png"),
        (123, "frame_001.png", "frame_123.png"),
    ],
)
def test_file_names(tmp_path: Path, count: int, first: str, last: str) -> None:
    plan = plan_of(tmp_path, identity_story([f"scene {i}" for i in range(count)]))
    files = [f.file for f in plan.frames]
    assert (files[0], files[-1]) == (first, last)
    assert len(set(files)) == count
    assert files == sorted(files)
    assert [f.number for f in plan.frames] == list(range(1, count + 1))


def test_shipped_examples_plan(tmp_path: Path) -> None:
    two = build_plan(load_story(REPO / "stories" / "two_friends.yaml"))
    assert {k: [i + 1 for i in v] for k, v in two.references.items()} == {
        "Mara": [1, 3],
        "Ollie": [2, 4],
    }
    lighthouse = build_plan(load_story(REPO / "stories" / "lighthouse.yaml"))
    assert lighthouse.references == {"identity": (0, 1, 2)}
    assert lighthouse.frames[3].characters == ()
    assert lighthouse.frames[1].caption == "Something is out there."
    fox = build_plan(load_story(REPO / "stories" / "fox_compare.yaml"))
    assert fox.references == {}
    assert {f.role for f in fox.frames} == {"plain"}


# --------------------------------------------------------------------------------------------------
# frame_key


def keys(plan: Plan, model: dict | None = None) -> list[str]:
    return [plan.frame_key(f.index, model or MODEL) for f in plan.frames]


def changed(before: list[str], after: list[str]) -> set[int]:
    return {i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b}


def test_frame_key_stable_across_builds(tmp_path: Path) -> None:
    first = keys(plan_of(tmp_path, TWO, "a.yaml"))
    second = keys(plan_of(tmp_path, TWO, "b.yaml"))
    assert first == second
    assert len(set(first)) == len(first)
    assert all(len(k) == 16 and int(k, 16) >= 0 for k in first)


def test_frame_key_changes_with_own_prompt_only(tmp_path: Path) -> None:
    before = keys(plan_of(tmp_path, TWO, "a.yaml"))
    # frame 6 reads Mara; nobody depends on it
    after = keys(plan_of(tmp_path, TWO.replace("walks home", "runs home"), "b.yaml"))
    assert changed(before, after) == {6}
    # frame 3 is [NC]
    after = keys(plan_of(tmp_path, TWO.replace("busy market", "quiet market"), "c.yaml"))
    assert changed(before, after) == {3}


def test_frame_key_changes_for_readers_when_a_reference_changes(tmp_path: Path) -> None:
    before = keys(plan_of(tmp_path, TWO, "a.yaml"))
    # frame 4 is Mara's second reference: her batch (1, 4), her solo reader 6 and the two
    # two-character frames 2 and 7 change; Ollie's frames (0, 5) and the [NC] frame 3 do not.
    after = keys(plan_of(tmp_path, TWO.replace("buys sunflowers", "buys tulips"), "b.yaml"))
    assert changed(before, after) == {1, 2, 4, 6, 7}
    # Ollie's first reference
    after = keys(plan_of(tmp_path, TWO.replace("sleeps on a windowsill", "naps"), "c.yaml"))
    assert changed(before, after) == {0, 2, 5, 7}


def test_frame_key_ignores_captions(tmp_path: Path) -> None:
    before = keys(plan_of(tmp_path, TWO, "a.yaml"))
    text = TWO.replace("#Zzz", "#Snore").replace("#Bye!", "#Later!").replace("#Market day.", "")
    text = text.replace('"[Mara] walks home"', '"[Mara] walks home #Home"')
    after_plan = plan_of(tmp_path, text, "b.yaml")
    assert after_plan.frames[0].caption == "Snore"
    assert keys(after_plan) == before


def test_frame_key_depends_on_model_settings_and_seed(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, TWO, "a.yaml")
    base = keys(plan)
    assert keys(plan, {"source": "sdxl", "variant": "fp16"}) != base
    assert changed(base, keys(plan_of(tmp_path, TWO + "steps: 31\n", "b.yaml"))) == set(range(8))
    reseeded = TWO.replace("seed: 11", "seed: 12")
    assert changed(base, keys(plan_of(tmp_path, reseeded, "c.yaml"))) == set(range(8))


def test_frame_key_without_consistency_batch_only(tmp_path: Path) -> None:
    plain = TWO.replace("method: storydiffusion", "method: none")
    before = keys(plan_of(tmp_path, plain, "a.yaml"))
    # Mara's batch (1, 4) is still denoised together; frames that would read her do not change.
    after = keys(plan_of(tmp_path, plain.replace("buys sunflowers", "buys tulips"), "b.yaml"))
    assert changed(before, after) == {1, 4}


# --------------------------------------------------------------------------------------------------
# generate --dry-run --json


def test_dry_run_json(tmp_path: Path) -> None:
    story = write(tmp_path, TWO)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["generate", str(story), "--dry-run", "--json", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["name"] == "two"
    assert plan["references"] == {"Mara": [2, 5], "Ollie": [1, 6]}
    assert plan["order"] == [
        {"phase": "write", "character": "Mara", "frames": [2, 5]},
        {"phase": "write", "character": "Ollie", "frames": [1, 6]},
        {"phase": "read", "character": None, "frames": [3]},
        {"phase": "plain", "character": None, "frames": [4]},
        {"phase": "read", "character": None, "frames": [7]},
        {"phase": "read", "character": None, "frames": [8]},
    ]
    frames = plan["frames"]
    assert [f["frame"] for f in frames] == list(range(1, 9))
    assert frames[0]["file"] == "frame_01.png"
    assert frames[0]["role"] == "reference"
    assert frames[0]["reference_of"] == "Ollie"
    assert frames[0]["caption"] == "Zzz"
    assert frames[2]["characters"] == ["Mara", "Ollie"]
    assert frames[3]["characters"] == []
    assert frames[1]["prompt"] == f"{MARA} waves at the gate"
    assert {f["seed"] for f in frames} == {11}
    assert plan["consistency"]["method"] == "storydiffusion"
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["story.yaml"]


def test_dry_run_seed_override(tmp_path: Path) -> None:
    story = write(tmp_path, TWO)
    result = CliRunner().invoke(app, ["generate", str(story), "--dry-run", "--json", "--seed", "5"])
    assert result.exit_code == 0, result.output
    assert {f["seed"] for f in json.loads(result.stdout)["frames"]} == {5}


def test_dry_run_table(tmp_path: Path) -> None:
    story = write(tmp_path, TWO)
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["generate", str(story), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "order: write(2, 5) → write(1, 6) → read(3) → plain(4) → read(7) → read(8)" in (
        result.output
    )


# --------------------------------------------------------------------------------------------------
# derive_seed


def test_derive_seed() -> None:
    assert derive_seed(7, "write", "Mara") == derive_seed(7, "write", "Mara")
    seeds = {
        derive_seed(7, "write", "Mara"),
        derive_seed(7, "write", "Ollie"),
        derive_seed(8, "write", "Mara"),
        derive_seed(7, "frame", 0),
        derive_seed(7, "frame", 1),
        derive_seed(7),
    }
    assert len(seeds) == 6
    for seed in seeds:
        assert 0 <= seed < 2**63


# --------------------------------------------------------------------------------------------------
# Token budget: SDXL's text encoders see 77 tokens (start and end included)

# 20 words that are one CLIP token each, and then some: 90 tokens on their own.
LONG_FRAME = " ".join(["cat", "dog", "sun", "moon", "tree"] * 18)


def test_keys_of_prompts_within_budget_are_unchanged(tmp_path: Path) -> None:
    # Pinned once the story loop's noise rule (`noise_index`) changed every key: fitting prompts
    # into the token budget and warnings change no key of a prompt that fits, so no finished
    # frame reruns. A change here means every user's finished frames are made again.
    assert keys(plan_of(tmp_path, TWO, "a.yaml")) == [
        "3f81d01c3c6d90a8",
        "a31836593797f003",
        "f8b6df3ba31d3f85",
        "dc9cd12f32f17c88",
        "afd40d691b138a07",
        "f707a934537389b4",
        "9142ba93e5361ee2",
        "63f43c2d1d89d320",
    ]
    styled = identity_story(["runs through the snow", "[NC] a dark forest"], "style: comic\n")
    assert keys(plan_of(tmp_path, styled, "b.yaml")) == ["73c8a6f23215e401", "aeb153dbb229f2b7"]


def test_long_prompt_keeps_the_style_and_warns(tmp_path: Path) -> None:
    comic = Configs().styles["comic"]
    text = identity_story(["runs through the snow", LONG_FRAME], "style: comic\n")
    plan = plan_of(tmp_path, text)
    short, long = plan.frames
    assert short.prompt == comic.apply("a fox with a blue scarf, runs through the snow")
    # The style's words are all there; the frame's own text lost words from its end.
    assert long.prompt.startswith("comic book panel, a fox with a blue scarf, cat dog sun")
    assert long.prompt.endswith(", bold ink lines, flat colours, graphic novel art")
    assert count_tokens(long.prompt) == 75  # one-token words fill the budget exactly
    # 15 style + 7 identity tokens leave 53 of the frame's 90 one-token words.
    kept = LONG_FRAME.split()[:53]
    assert long.prompt == comic.apply(f"a fox with a blue scarf, {' '.join(kept)}")
    # The warning quotes at most 80 characters of what was dropped.
    dropped = quote(" ".join(LONG_FRAME.split()[53:]))
    assert len(dropped) == 80 and dropped.endswith("…")
    assert plan.warnings == (
        PlanWarning(
            ("frames", 1),
            # 15 style, 7 identity, 90 frame tokens, start and end.
            f'prompt is 114 tokens, over the text encoder\'s 77: dropped "{dropped}"; '
            "shorten the frame or its character description",
        ),
    )
    assert str(plan.warnings[0]).startswith("frames[1]: prompt is 114 tokens")


def test_long_prompt_without_style_is_trimmed_at_a_word(tmp_path: Path) -> None:
    # "lighthousekeeper" is 3 tokens: the encoder would keep "ligh" of it, and the plan would
    # show a prompt the model never sees.
    frame = "[NC] " + "cat " * 74 + "lighthousekeeper in a vase"
    plan = plan_of(tmp_path, identity_story([frame]))
    assert plan.frames[0].prompt == ("cat " * 74).strip()
    (warning,) = plan.warnings
    assert warning.loc == ("frames", 0)
    assert warning.message.endswith('dropped "lighthousekeeper in a vase"; shorten it')


def test_long_character_description_is_named_in_the_warning(tmp_path: Path) -> None:
    text = TWO.replace(f"Mara: {MARA}", f"Mara: {MARA}, {LONG_FRAME}")
    plan = plan_of(tmp_path, text)
    # Every frame that shows Mara is over budget, and nothing else.
    mara = [f.index for f in plan.frames if "Mara" in f.characters]
    assert [w.loc for w in plan.warnings] == [("frames", i) for i in mara]
    assert all("or its character description" in w.message for w in plan.warnings)
    assert all(count_tokens(plan.frames[i].prompt) <= 75 for i in mara)


def test_long_negative_warns(tmp_path: Path) -> None:
    negative = ", ".join(["blurry"] * 40)  # 79 tokens with its commas
    plan = plan_of(tmp_path, identity_story(["runs"], f'style: comic\nnegative: "{negative}"\n'))
    (warning,) = plan.warnings
    assert warning.loc == ("negative",)
    # The style's negative (13 tokens and a comma) comes first: the end of the story's goes.
    assert warning.message.startswith("negative prompt (style's, then the story's) is 95 tokens")
    # 93 tokens: the last 18 (nine ", blurry") are cut.
    ignored = ", ".join(["blurry"] * 9)
    assert warning.message.endswith(f'"{ignored}" is ignored; shorten it')


def test_shipped_examples_have_no_warnings() -> None:
    for example in sorted((REPO / "stories").glob("*.yaml")):
        assert build_plan(load_story(example)).warnings == (), example


def test_dry_run_json_lists_warnings(tmp_path: Path) -> None:
    story = write(tmp_path, identity_story([LONG_FRAME, "runs"]))
    result = CliRunner().invoke(app, ["generate", str(story), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    warnings = json.loads(result.stdout)["warnings"]
    assert [w["field"] for w in warnings] == ["frames[0]"]
    assert warnings[0]["message"].startswith("prompt is 99 tokens, over the text encoder's 77")


def test_validation_and_planning_do_not_import_torch(tmp_path: Path) -> None:
    path = write(tmp_path, identity_story([LONG_FRAME]))
    code = (
        "import sys\n"
        "from storycli.keyframes.plan import build_plan\n"
        "from storycli.story.loader import load_story\n"
        f"assert build_plan(load_story({str(path)!r})).warnings\n"
        "print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------------
# Story warnings


def test_character_names_differing_only_in_case_warn(tmp_path: Path) -> None:
    text = """\
    characters:
      Ann: a girl with a red scarf
      Bob: a boy
      ann: an old woman
    model: tiny
    consistency: {method: none}
    frames:
      - "[Ann] runs"
      - "[ann] knits"
    """
    plan = plan_of(tmp_path, text)
    assert plan.warnings == (
        PlanWarning(
            ("characters", "ann"),
            "'ann' and 'Ann' differ only in case; tags are case-sensitive, so [ann] and [Ann] "
            "are two characters: rename one",
        ),
    )
    assert plan.frames[1].prompt == "an old woman knits"


def test_distinct_names_do_not_warn(tmp_path: Path) -> None:
    assert plan_of(tmp_path, TWO).warnings == ()
