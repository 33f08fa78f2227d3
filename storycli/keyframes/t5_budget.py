"""FLUX.1's T5 prompt budget, counted offline without torch or transformers.

FLUX.1 reads a prompt twice: CLIP's pooled vector (cut at 77 tokens, as SDXL's; expected, so not
warned about) and T5's per-token states, up to the T5 tokenizer's `model_max_length` (at most
512), or the model preset's `t5_tokens` when less (schnell's 256): the plan's `t5_tokens`, the
backbone's `sequence_length`. The plan counts each prompt with the model's own T5
tokenizer where one is on disk (a local folder's or cached snapshot's `tokenizer_2/tokenizer.json`,
read with the `tokenizers` library; the tiny model's built in code), so `validate` and `--dry-run`
warn about what T5 would drop, before any load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from storycli.config import Configs
from storycli.story.family import model_source, source_folder

if TYPE_CHECKING:
    import tokenizers

#: T5's longest prompt in FLUX (the pipeline refuses more), its closing `</s>` included.
MAX_T5_TOKENS = 512


@dataclass(frozen=True)
class T5Counter:
    """A FLUX.1 model's T5 tokenizer and the positions its prompts get."""

    tokenizer: tokenizers.Tokenizer
    budget: int  # positions, the closing `</s>` included

    def count(self, text: str) -> int:
        """Positions `text` takes, the closing `</s>` included."""
        return len(self.tokenizer.encode(text).ids)

    def cut(self, text: str) -> str | None:
        """The end of `text` T5 never sees (as written), or None if it fits: diffusers keeps
        `budget - 1` prompt tokens and the closing `</s>`."""
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        keep = self.budget - 1
        if len(encoding.ids) <= keep:
            return None
        return text[encoding.offsets[keep][0] :].strip(" ,") or None


@lru_cache(maxsize=8)
def _read_tokenizer(folder: Path) -> T5Counter | None:
    """The T5 tokenizer of a diffusers FLUX.1 folder, or None when it has no tokenizer.json
    (a sentencepiece-only tokenizer needs transformers: not counted here)."""
    from tokenizers import Tokenizer

    file = folder / "tokenizer_2" / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception:  # a broken file: the load says what is wrong with it
        return None
    # Counting must see every token: a saved padding or truncation would hide the excess.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    budget = MAX_T5_TOKENS
    try:
        config = json.loads((file.parent / "tokenizer_config.json").read_text(encoding="utf-8"))
        length = config.get("model_max_length")
        if isinstance(length, int) and length > 0:
            budget = min(length, MAX_T5_TOKENS)  # as the backbone's `sequence_length`
    except (OSError, ValueError, AttributeError):
        pass  # no config: the backbone falls back to 512 as well
    return T5Counter(tokenizer, budget)


def preset_t5_tokens(model: str, configs: Configs) -> int | None:
    """The `t5_tokens:` of the preset `model` names (None: not a preset, or it sets none)."""
    preset = configs.presets.get(model)
    return preset.t5_tokens if preset is not None else None


def t5_counter(model: str, configs: Configs, base_dir: Path) -> T5Counter | None:
    """The T5 counter of a FLUX.1 story's `model:`, or None when no T5 tokenizer is on disk
    (a hub id not cached, a single transformer file). Its budget is the tokenizer's, or the
    preset's `t5_tokens` when that is less."""
    source = model_source(model, configs, base_dir)
    if source == "tiny-flux":
        from storycli.weights.tiny_words import TINY_T5_LENGTH, t5_unigram

        counter: T5Counter | None = T5Counter(t5_unigram(), TINY_T5_LENGTH)
    else:
        folder = source_folder(source)
        counter = _read_tokenizer(folder) if folder is not None else None
    tokens = preset_t5_tokens(model, configs)
    if counter is None or tokens is None or tokens >= counter.budget:
        return counter
    return T5Counter(counter.tokenizer, tokens)
