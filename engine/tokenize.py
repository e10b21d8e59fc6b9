"""Tokenization with the `tokenizers` library from an exported tokenizer folder, as transformers pads it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .errors import EngineError


def _token_text(token) -> str | None:
    if isinstance(token, dict):
        return token.get("content")
    return token


@dataclass
class Tokens:
    ids: np.ndarray  # (1, max_length) int64
    truncated: bool


class PromptTokenizer:
    """Pads to ``max_length`` and truncates, like ``tokenizer(prompt, padding="max_length", truncation=True)``."""

    def __init__(self, folder: Path, max_length: int | None = None):
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise EngineError(f"{path} is missing; export the model again")
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.tokenizer = Tokenizer.from_file(str(path))
        self.max_length = int(max_length or min(config.get("model_max_length", 77), 10**6))
        pad = _token_text(config.get("pad_token")) or _token_text(config.get("eos_token"))
        pad_id = self.tokenizer.token_to_id(pad) if pad else None
        if pad_id is None:
            raise EngineError(f"{config_path} names no usable pad token; export the model again")
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer.enable_padding(length=self.max_length, pad_id=pad_id, pad_token=pad)
        self.name = folder.name

    def __call__(self, text: str) -> Tokens:
        encoding = self.tokenizer.encode(text)
        return Tokens(np.asarray([encoding.ids], dtype=np.int64), truncated=bool(encoding.overflowing))
