"""Tokenization with the `tokenizers` library from an exported tokenizer folder, as transformers pads it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from .errors import EngineError


def _token_text(token) -> str | None:
    if isinstance(token, dict):
        return token.get("content")
    return token


@dataclass
class Tokens:
    ids: np.ndarray  # (1, max_length) int64; (1, tokens) when not padded
    truncated: bool
    mask: np.ndarray | None = None  # (1, len(ids)) int64: 1 for the text's tokens, 0 for padding


class PromptTokenizer:
    """Pads to ``max_length`` and truncates, like ``tokenizer(prompt, padding="max_length", truncation=True)``;
    with ``pad=False`` only truncates, like ``tokenizer(prompt, max_length=..., truncation=True)`` (Qwen-Image)."""

    def __init__(self, folder: Path, max_length: int | None = None, *, pad: bool = True):
        path = folder / "tokenizer.json"
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        if path.is_file():
            self.tokenizer = Tokenizer.from_file(str(path))
        elif str(config.get("tokenizer_class", "")).startswith("CLIPTokenizer") and (folder / "merges.txt").is_file():
            self.tokenizer = clip_from_slow_files(folder, config)  # optimum's exports carry only the slow files
        else:
            raise EngineError(f"{path} is missing; export the model again")
        self.max_length = int(max_length or min(config.get("model_max_length", 77), 10**6))
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer.no_padding()
        if pad:
            token = _token_text(config.get("pad_token")) or _token_text(config.get("eos_token"))
            pad_id = self.tokenizer.token_to_id(token) if token else None
            if pad_id is None:
                raise EngineError(f"{config_path} names no usable pad token; export the model again")
            self.tokenizer.enable_padding(length=self.max_length, pad_id=pad_id, pad_token=token)
        self.name = folder.name

    def __call__(self, text: str) -> Tokens:
        encoding = self.tokenizer.encode(text)
        return Tokens(
            np.asarray([encoding.ids], dtype=np.int64),
            truncated=bool(encoding.overflowing),
            mask=np.asarray([encoding.attention_mask], dtype=np.int64),
        )


def clip_from_slow_files(folder: Path, config: dict) -> Tokenizer:
    """CLIPTokenizer's ``vocab.json`` + ``merges.txt`` as the fast tokenizer, built as transformers'
    ``CLIPConverter`` builds it (what ``tokenizer.json`` of an export holds), with the `tokenizers` library."""
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").strip().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]  # as CLIPTokenizer reads them
    unk = _token_text(config.get("unk_token")) or "<|endoftext|>"
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=unk,
        )
    )
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    bos = _token_text(config.get("bos_token")) or "<|startoftext|>"
    eos = _token_text(config.get("eos_token")) or "<|endoftext|>"
    tokenizer.post_processor = processors.RobertaProcessing(
        sep=(eos, vocab[eos]), cls=(bos, vocab[bos]), add_prefix_space=False, trim_offsets=False
    )
    # the special tokens transformers registers as added tokens, matched before BPE: the config's
    # added_tokens_decoder, or (older configs) its bos/eos/unk/pad tokens
    added = config.get("added_tokens_decoder") or {
        str(i): t if isinstance(t, dict) else {"content": t}
        for i, t in enumerate(config.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token"))
        if t
    }
    specials = [
        AddedToken(
            token["content"],
            single_word=token.get("single_word", False),
            lstrip=token.get("lstrip", False),
            rstrip=token.get("rstrip", False),
            normalized=token.get("normalized", True),
            special=True,
        )
        for _, token in sorted(added.items(), key=lambda item: int(item[0]))
    ]
    tokenizer.add_special_tokens(specials)
    return tokenizer
