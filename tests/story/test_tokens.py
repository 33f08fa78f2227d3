"""Tests for prompt token counting (storycli.story.tokens): the shipped CLIP vocabulary against
transformers' CLIPTokenizer and OpenAI's own algorithm, trimming into the 77-token window, and
the generation-time check with a pipeline's tokenizer."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest
import regex

from storycli.story import tokens
from storycli.story.tokens import (
    CONTENT_TOKENS,
    MAX_LENGTH,
    clip_tokenizer,
    count_tokens,
    dropped_words,
    encoder_cut,
    fit_prompt,
)

LONG = (
    "a girl with curly black hair, a yellow raincoat and red boots walks along the harbour wall "
    "at dawn while gulls circle above the fishing boats, the lighthouse beam sweeps across the "
    "grey water, waves crash against the rocks, her small grey cat with a white chest follows "
    "her, carrying a lantern, a wicker basket of bread and a folded map of the island"
)

PROMPTS = [
    "a photo of a cat",
    "comic book panel, a girl with curly black hair waves at the gate, bold ink lines",
    "A GIRL With Mixed CASE Words",
    "it's a dog's life; they're sure we've I'm you'll he'd",
    "1234 apples, 3.14 pies and 1,000,000 stars",
    "café naïve résumé Zürich São Paulo",
    "tabs\tand\nnewlines   and  many    spaces",
    "a dragon 🐉 and a fox 🦊 under a 🌙!!",
    "日本の城と桜, a castle in Kyoto",
    "well-known, high-contrast, over-the-top; (masterpiece:1.2) [detailed] {sharp}",
    "«quotes» — dashes – and … ellipses ... ?!",
    "sunflowers",
    LONG,
    LONG + ", " + LONG,
]


# --------------------------------------------------------------------------------------------------
# References: transformers' CLIPTokenizer from vocab.json/merges.txt as the hub ships them, and
# OpenAI's SimpleTokenizer algorithm written out here from the file, independent of `tokenizers`.


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip-tokenizer")
    vocab, merges = tokens.clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    lines = ["#version: 0.2", *(" ".join(m) for m in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # As in the hub's openai/clip-vit-large-patch14 and SDXL's tokenizer/ folders.
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 77, "do_lower_case": True}), encoding="utf-8"
    )
    return CLIPTokenizer.from_pretrained(str(folder))


def _bytes_to_unicode() -> dict[int, str]:
    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


class OpenAISimpleTokenizer:
    """OpenAI CLIP's `SimpleTokenizer` (clip/simple_tokenizer.py), without ftfy/html cleaning."""

    def __init__(self, path: Path) -> None:
        lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        self.byte_encoder = _bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {v: i for i, v in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.pat = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
            r"""|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )

    def bpe(self, token: str) -> list[str]:
        word = (*token[:-1], token[-1] + "</w>")
        while len(word) > 1:
            pairs = set(pairwise(word))
            bigram = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if bigram not in self.ranks:
                break
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == bigram:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = tuple(out)
        return list(word)

    def encode(self, text: str) -> list[int]:
        text = " ".join(text.split()).lower()
        ids = []
        for piece in self.pat.findall(text):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids += [self.encoder[t] for t in self.bpe(mapped)]
        return ids


@pytest.fixture(scope="module")
def openai_tokenizer() -> OpenAISimpleTokenizer:
    return OpenAISimpleTokenizer(tokens.VOCAB_FILE)


def test_shipped_file_is_openai_clip_vocabulary() -> None:
    digest = hashlib.sha256(tokens.VOCAB_FILE.read_bytes()).hexdigest()
    assert digest == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    notice = tokens.VOCAB_FILE.with_name("LICENSE-bpe_simple_vocab_16e6.txt").read_text()
    assert "Copyright (c) 2021 OpenAI" in notice and digest in notice


def test_vocabulary_is_clip_vit_large_patch14() -> None:
    tokenizer = clip_tokenizer()
    assert tokenizer.get_vocab_size() == 49408
    assert tokenizer.token_to_id("<|startoftext|>") == 49406
    assert tokenizer.token_to_id("<|endoftext|>") == 49407
    # The ids every CLIP example shows.
    ids = tokenizer.encode("a photo of a cat", add_special_tokens=False).ids
    assert ids == [320, 1125, 539, 320, 2368]


@pytest.mark.parametrize("prompt", PROMPTS, ids=range(len(PROMPTS)))
def test_tokens_match_transformers_and_openai(
    prompt: str, hf_tokenizer, openai_tokenizer: OpenAISimpleTokenizer
) -> None:
    ours = clip_tokenizer().encode(prompt, add_special_tokens=False).ids
    hf = hf_tokenizer(prompt, verbose=False).input_ids
    assert hf == [49406, *ours, 49407]
    assert ours == openai_tokenizer.encode(prompt)
    assert count_tokens(prompt) == len(hf) - 2
    # What diffusers' `truncation=True` cuts is exactly what we say is cut.
    kept = hf_tokenizer(prompt, truncation=True, max_length=MAX_LENGTH).input_ids
    assert kept[1:-1] == ours[:CONTENT_TOKENS]


def test_long_prompts_are_long() -> None:
    # The fixtures above must include prompts over the limit, or trimming is untested.
    assert count_tokens(LONG) < CONTENT_TOKENS < count_tokens(LONG + ", " + LONG)


def test_tokenizer_is_built_once() -> None:
    assert clip_tokenizer() is clip_tokenizer()


def test_counting_imports_neither_torch_nor_transformers(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from storycli.story.tokens import count_tokens\n"
        "assert count_tokens('a photo of a cat') == 5\n"
        "print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------------
# fit_prompt


def comic(text: str) -> str:
    return f"comic book panel, {text}, bold ink lines, flat colours"


def test_prompt_within_budget_is_unchanged() -> None:
    fitted = fit_prompt("a girl waves", comic)
    assert fitted.prompt == comic("a girl waves")
    assert fitted.dropped is None
    assert fitted.tokens == count_tokens(comic("a girl waves")) + 2


def test_over_budget_keeps_the_style_and_drops_words_from_the_end() -> None:
    text = LONG + ", " + LONG
    fitted = fit_prompt(text, comic)
    assert fitted.trimmed
    assert fitted.tokens == count_tokens(comic(text)) + 2 > MAX_LENGTH
    assert fitted.prompt.endswith(", bold ink lines, flat colours")
    assert count_tokens(fitted.prompt) <= CONTENT_TOKENS
    kept = fitted.prompt.removeprefix("comic book panel, ").removesuffix(
        ", bold ink lines, flat colours"
    )
    # Whole words, the longest start of the text that fits: one more word would not.
    assert text.startswith(kept)
    assert f"{kept} {fitted.dropped}".replace(", ", " ").split() == text.replace(",", "").split()
    next_word = fitted.dropped.split()[0]
    assert count_tokens(comic(f"{kept} {next_word}".rstrip(","))) > CONTENT_TOKENS


def test_dangling_punctuation_before_the_suffix_is_removed() -> None:
    # 72 one-token words, a comma and one more word (74 tokens), then the style's ", bold":
    # dropping "extra" must not give "cat,, bold".
    text = "cat " * 71 + "cat, extra"
    fitted = fit_prompt(text, lambda s: f"{s}, bold")
    assert fitted.prompt == "cat " * 71 + "cat, bold"
    assert fitted.dropped == "extra"


@pytest.mark.parametrize("extra", [0, 1])
def test_budget_boundary(extra: int) -> None:
    # "cat" is one token: 75 fit exactly (77 with start and end), 76 do not.
    text = " ".join(["cat"] * (CONTENT_TOKENS + extra))
    fitted = fit_prompt(text)
    assert (fitted.dropped is None) == (extra == 0)
    assert count_tokens(fitted.prompt) == CONTENT_TOKENS
    assert fitted.tokens == MAX_LENGTH + extra


def test_style_alone_over_budget_is_left_to_the_encoder() -> None:
    def huge(text: str) -> str:
        return f"{text}, " + "bold ink " * 40

    fitted = fit_prompt("a girl waves at the gate", huge)
    assert not fitted.trimmed
    assert fitted.prompt == huge("a girl waves at the gate")
    assert fitted.dropped == encoder_cut(fitted.prompt)
    # 7 tokens of frame text, then 80 of style: the encoder sees 68 of them.
    assert fitted.dropped == ("bold ink " * 6).strip()


def test_encoder_cut_gives_the_text_as_written(hf_tokenizer) -> None:
    text = "Cat " * CONTENT_TOKENS + "Sunflowers in a Vase"
    assert encoder_cut(text) == "Sunflowers in a Vase"
    assert encoder_cut("a cat") is None


# --------------------------------------------------------------------------------------------------
# dropped_words: with the pipeline's own tokenizer


def test_dropped_words_with_clip_tokenizer(hf_tokenizer) -> None:
    assert dropped_words(LONG, hf_tokenizer) is None
    text = "Cat " * CONTENT_TOKENS + "Sunflowers in a Vase"
    assert dropped_words(text, hf_tokenizer) == "Sunflowers in a Vase"
    # The same as what the encoder ignores by our own count.
    assert dropped_words(LONG + ", " + LONG, hf_tokenizer) == encoder_cut(LONG + ", " + LONG)


def test_dropped_words_with_the_tiny_tokenizer(capfd: pytest.CaptureFixture[str]) -> None:
    # The tiny model's tokenizer splits words into far more tokens than CLIP's.
    from storycli.weights.tiny import build_tokenizer

    tiny = build_tokenizer()
    assert dropped_words("a cat", tiny) is None
    capfd.readouterr()
    assert dropped_words(LONG, tiny) is not None
    # The check itself must not log transformers' "longer than the maximum" line.
    assert "longer than the specified maximum" not in capfd.readouterr().err
    ids = tiny(LONG, add_special_tokens=False).input_ids
    budget = tiny.model_max_length - 2
    assert len(ids) > budget > count_tokens(LONG)
    dropped = dropped_words(LONG, tiny)
    assert dropped is not None and LONG.endswith(dropped)
    kept = tiny(LONG, truncation=True, max_length=tiny.model_max_length).input_ids
    assert tiny.decode(kept, skip_special_tokens=True).replace(" ", "") + dropped.replace(
        " ", ""
    ) == LONG.replace(" ", "")
