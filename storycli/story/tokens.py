"""Prompt tokens as SDXL's text encoders count them, offline and without torch.

Both SDXL text encoders (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14) tokenize with OpenAI CLIP's
byte-level BPE vocabulary (49408 tokens) and see at most 77 positions, start and end token
included; diffusers cuts every prompt to that. The vocabulary ships with the package
(data/bpe_simple_vocab_16e6.txt.gz, MIT, OpenAI) so `validate` counts exactly, with no hub.

Only `tokenizers` (the Rust library) is imported: no torch, no transformers.
"""

from __future__ import annotations

import bisect
import gzip
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tokenizers

#: Positions of SDXL's text encoders, the start and end token included.
MAX_LENGTH = 77
#: Prompt tokens that fit between the start and the end token.
CONTENT_TOKENS = MAX_LENGTH - 2

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
EOW = "</w>"

VOCAB_FILE = Path(__file__).resolve().parent.parent / "data" / "bpe_simple_vocab_16e6.txt.gz"

# The file holds 262145 merges; CLIP uses the first 49152 - 256 - 2 of them (after a header
# line), so that bytes, bytes + "</w>", merges and the two special tokens make 49408 entries.
_NUM_MERGES = 49152 - 256 - 2

# CLIP's split: special tokens, English contractions, letter runs, single digits, punctuation
# runs; whitespace separates pieces and is dropped. The same pattern as HF's CLIPTokenizer.
_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
    r"""|[^\s\p{L}\p{N}]+"""
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (CLIP's too)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary and merges, built from the shipped file as OpenAI's SimpleTokenizer
    and HF's `openai/clip-vit-large-patch14` vocab.json/merges.txt do."""
    lines = gzip.decompress(VOCAB_FILE.read_bytes()).decode("utf-8").split("\n")
    merges = [(a, b) for a, b in (line.split() for line in lines[1 : _NUM_MERGES + 1])]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + EOW for c in byte_chars] + [a + b for a, b in merges]
    tokens += [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


@lru_cache(maxsize=1)
def clip_tokenizer() -> tokenizers.Tokenizer:
    """OpenAI CLIP's tokenizer as a `tokenizers.Tokenizer`, built once per process.

    The pipeline mirrors transformers' `CLIPTokenizer`: NFC, whitespace runs to one space and
    lower-casing; CLIP's split regex; byte-level BPE with the end-of-word suffix `</w>`. No
    post-processor: encodings hold the prompt's own tokens, without start and end.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    vocab, merges = clip_vocab_and_merges()
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix=EOW,
            fuse_unk=False,
            unk_token=EOS,
        )
    )
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([BOS, EOS])
    return tokenizer


def count_tokens(text: str) -> int:
    """The prompt tokens `text` takes, without the start and end token."""
    return len(clip_tokenizer().encode(text, add_special_tokens=False).ids)


def encoder_cut(text: str, budget: int = CONTENT_TOKENS) -> str | None:
    """The end of `text` that the text encoder never sees (as written), or None if it fits."""
    encoding = clip_tokenizer().encode(text, add_special_tokens=False)
    if len(encoding.ids) <= budget:
        return None
    return text[encoding.offsets[budget][0] :].strip(" ,") or None


@dataclass(frozen=True)
class Fitted:
    """A prompt fitted into the text encoder's window."""

    prompt: str  # what to encode: within budget, unless `trimmed` is False and `dropped` is set
    tokens: int  # the untrimmed prompt's tokens, start and end included
    dropped: str | None  # the words removed (trimmed) or cut by the encoder (not trimmed)
    trimmed: bool  # False: even one word of `text` does not fit beside the template


#: Tokens a word's trailing `,;:` or the style template may take back from a prefix's count
#: (see `_fit`); candidates within this many tokens over the budget are tried exactly.
_SLACK = 8


def fit_prompt(text: str, wrap: Callable[[str], str] = str, budget: int = CONTENT_TOKENS) -> Fitted:
    """Fit `wrap(text)` into `budget` tokens by dropping words from the end of `text`.

    `wrap` is the style template, so the style's words stay whole and the frame's own text gives
    way. Whole words are dropped, and punctuation left dangling before the template's rest.
    Results are cached: a story repeats one prompt in many frames (YAML aliases, say).
    """
    try:
        hash(wrap)
    except TypeError:
        return _fit(text, wrap, budget)
    return _fit_cached(text, wrap, budget)


@lru_cache(maxsize=256)
def _fit_cached(text: str, wrap: Callable[[str], str], budget: int) -> Fitted:
    return _fit(text, wrap, budget)


def _fit(text: str, wrap: Callable[[str], str], budget: int) -> Fitted:
    full = wrap(text)
    tokens = count_tokens(full)
    if tokens <= budget:
        return Fitted(full, tokens + 2, None, trimmed=False)
    ends = [match.end() for match in re.finditer(r"\S+", text)][:-1]
    # One encoding of `text` bounds the words that can fit: CLIP's pieces never span whitespace,
    # so text[:end] takes the tokens of `text` that end by `end`, and the template only adds
    # tokens (less a trailing `,;:` that `kept` drops: the slack). Only the words up to that
    # bound are tried, so trimming is linear in the prompt's length, not quadratic.
    token_ends = [
        stop for _, stop in clip_tokenizer().encode(text, add_special_tokens=False).offsets
    ]
    counts = [bisect.bisect_right(token_ends, end) for end in ends]
    ends = ends[: bisect.bisect_right(counts, budget + _SLACK)]
    # Longest first; at least one word stays, or the frame would lose its whole subject.
    for end in reversed(ends):
        kept = text[:end].rstrip(" ,;:")
        if kept and count_tokens(wrap(kept)) <= budget:
            return Fitted(wrap(kept), tokens + 2, text[end:].strip(), trimmed=True)
    return Fitted(full, tokens + 2, encoder_cut(full, budget), trimmed=False)


def quote(text: str, limit: int = 80) -> str:
    """`text` for a message: at most `limit` characters, an ellipsis marking the rest."""
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def dropped_words(prompt: str, tokenizer: Any) -> str | None:
    """What a pipeline's own tokenizer cuts from `prompt` (None: nothing).

    Works with any transformers tokenizer: `model_max_length` positions, less the special tokens
    it adds (CLIP: start and end), hold prompt tokens, as in diffusers' `truncation=True`.
    """
    limit = tokenizer.model_max_length
    budget = limit - tokenizer.num_special_tokens_to_add(pair=False)
    # verbose=False: no "sequence length is longer than" log line; this is that check.
    ids = tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids
    if len(ids) <= budget:
        return None
    try:
        offsets = tokenizer(
            prompt, add_special_tokens=False, return_offsets_mapping=True, verbose=False
        ).offset_mapping
    except (NotImplementedError, ValueError):  # slow (Python) tokenizers have no offsets
        return tokenizer.decode(ids[budget:]).strip(" ,") or None
    # Offsets give the words as written (CLIP's decode would give them lower-cased).
    return prompt[offsets[budget][0] :].strip(" ,") or None
