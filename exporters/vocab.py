"""Tokenizers for the tiny pipelines: the real CLIP BPE vocabulary, and a small T5-style tokenizer.

CLIP: ``assets/bpe_simple_vocab_16e6.txt.gz`` is converted the way CLIP's ``SimpleTokenizer`` reads it
into the ``vocab.json`` + ``merges.txt`` pair of ``transformers.CLIPTokenizer`` (49,408 ids, the same ids
as ``openai/clip-vit-large-patch14``). T5: a character-level Unigram model with T5's special tokens
(``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), ``▁`` metaspace pre-tokenization and ``</s>`` appended, wrapped in
``T5TokenizerFast`` (real T5 checkpoints ship a SentencePiece model we cannot build offline).
"""

from __future__ import annotations

import gzip
import json
import string
import tempfile
from functools import lru_cache
from pathlib import Path

ASSETS = Path(__file__).with_name("assets")
BPE_GZ = ASSETS / "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
T5_SPECIAL = ("<pad>", "</s>", "<unk>")


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte → printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """What ``SimpleTokenizer`` builds from the .gz: the token → id table and the merge rules in order."""
    lines = gzip.open(BPE_GZ).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(merge.split()) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    return {token: i for i, token in enumerate(vocab)}, merges


@lru_cache(maxsize=1)
def clip_files() -> tuple[Path, Path]:
    """``vocab.json`` and ``merges.txt`` written once per process into a temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="stepwise-clip-vocab-"))
    vocab, merges = clip_vocab_and_merges()
    vocab_file = folder / "vocab.json"
    merges_file = folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A slow ``CLIPTokenizer`` with the real vocabulary and the real checkpoints' special tokens.

    SD 1.5 / CLIP-L pad with ``<|endoftext|>``; SDXL's and SD3's second tokenizer (OpenCLIP bigG) pads
    with ``!``.
    """
    from transformers import CLIPTokenizer

    vocab_file, merges_file = clip_files()
    return CLIPTokenizer(
        str(vocab_file),
        str(merges_file),
        errors="replace",
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token=pad_token,
        model_max_length=CLIP_MAX_LENGTH,
    )


def t5_tokenizer(model_max_length: int = 512):
    """A small ``T5TokenizerFast``: T5's special tokens and pipeline, character-level pieces."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = [c for c in string.printable if c not in string.whitespace]
    pieces = [(tok, 0.0) for tok in T5_SPECIAL]
    pieces += [("▁", -2.0)] + [("▁" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("  ", " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return T5TokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=model_max_length,
    )


def t5_vocab_size() -> int:
    return len(T5_SPECIAL) + 1 + 2 * len([c for c in string.printable if c not in string.whitespace])
