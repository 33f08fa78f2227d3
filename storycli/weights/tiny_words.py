"""The tiny models' words and the tiny T5 tokenizer, torch-free (the plan counts FLUX.1 prompts
with it, `--model tiny-flux`, without loading torch or transformers).

`weights.tiny` learns its CLIP BPE from these words; `weights.tiny_flux` wraps `t5_unigram` in a
`T5TokenizerFast`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tokenizers

#: The tiny T5's sequence budget (FLUX.1-schnell's real one is 256, dev's 512).
TINY_T5_LENGTH = 64

_SPECIAL = ("<pad>", "</s>", "<unk>")
_MARK = "\u2581"  # sentencepiece's word-start mark

# A fixed corpus for learning the BPE merges; order matters only for reproducibility.
_CORPUS = """
    a an the and or of in on at to from with by for over under into onto through behind
    beside between near far above below inside outside is are was were be been being has
    have had do does did will would can could should may might must this that these those
    he she it they we you i his her its their our your my me him them us who what where
    when why how which there here then than very more most some many few all every each
    one two three four five first last next new old young little big small tall short long
    happy sad angry calm brave quiet loud bright dark light warm cold soft hard red blue
    green yellow orange purple pink black white gray brown golden silver wooden stone
    photo picture image portrait painting drawing illustration sketch scene view shot
    close wide cinematic detailed realistic style art artwork digital watercolor anime
    cartoon comic oil colorful vivid dramatic lighting sunlight moonlight shadow glow
    cat cats dog dogs bird birds horse fox wolf bear rabbit mouse dragon fish owl lion
    girl boy woman women man men child children baby friend family king queen prince
    princess knight wizard witch robot hero teacher farmer sailor pirate soldier doctor
    face eyes hair hand hands smile dress coat hat boots cloak sword shield book lamp
    house home room door window table chair bed kitchen garden street road bridge city
    town village castle tower school market shop forest tree trees flower flowers grass
    river lake sea ocean beach mountain mountains hill valley field desert snow rain
    storm cloud clouds sky sun moon star stars night morning evening day winter summer
    spring autumn fire water wind earth ship boat train car bike
    walking running sitting standing looking holding reading writing playing flying
    swimming sleeping eating talking smiling crying laughing dancing singing fighting
    opens walks runs sits stands looks holds reads finds meets sees says goes comes takes
    gives makes plays flies swims sleeps eats talks smiles cries laughs waits returns
    together alone again away back down up out off around along across toward story
    chapter end beginning adventure journey dream magic secret treasure map letter gift
"""
WORDS: tuple[str, ...] = tuple(_CORPUS.split())


def t5_unigram() -> tokenizers.Tokenizer:
    """A small T5-style Unigram tokenizer built in code: the word list (each word with its
    word-start mark), every lowercase letter, digit and common punctuation mark alone and
    marked, `<unk>` for anything else; `</s>` appended, as T5's."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    singles = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-:;()#[]"
    pieces = [_MARK + w for w in WORDS] + [_MARK + c for c in singles] + list(singles) + [_MARK]
    vocab = [(token, 0.0) for token in _SPECIAL]
    seen = set(_SPECIAL)
    for piece in pieces:
        if piece not in seen:
            seen.add(piece)
            # Longer pieces score higher, so whole words win over spelling them out.
            vocab.append((piece, -10.0 + len(piece)))
    tok = Tokenizer(Unigram(vocab, unk_id=_SPECIAL.index("<unk>"), byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_MARK, prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement=_MARK, prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return tok
