"""Text encoders as the pipelines use them: CLIP (last, penultimate and pooled states) and T5."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .session import Graph
from .tokenize import PromptTokenizer


@dataclass
class Encoded:
    last_hidden: np.ndarray  # (1, S, D)
    penultimate: np.ndarray | None  # hidden_states[-2], what SDXL and SD3 condition on
    pooled: np.ndarray | None  # pooler_output, or text_embeds for encoders with a projection
    truncated: bool


class TextEncoder:
    """One tokenizer + encoder graph. Works for CLIPTextModel, CLIPTextModelWithProjection and T5EncoderModel."""

    def __init__(self, graph: Graph, tokenizer: PromptTokenizer):
        self.graph, self.tokenizer = graph, tokenizer
        layers = [int(m.group(1)) for name in graph.outputs if (m := re.fullmatch(r"hidden_states\.(\d+)", name))]
        # hidden_states.0 is the embedding output, hidden_states.N the last layer: N-1 is the penultimate
        self.penultimate_name = f"hidden_states.{max(layers) - 1}" if layers else None
        self.pooled_name = next((n for n in ("text_embeds", "pooler_output") if n in graph.outputs), None)
        self.max_length = tokenizer.max_length

    def __call__(self, text: str) -> Encoded:
        tokens = self.tokenizer(text)
        wanted = ["last_hidden_state"] + [n for n in (self.penultimate_name, self.pooled_name) if n]
        out = self.graph(outputs=wanted, input_ids=tokens.ids)
        return Encoded(
            last_hidden=out["last_hidden_state"],
            penultimate=out.get(self.penultimate_name) if self.penultimate_name else None,
            pooled=out.get(self.pooled_name) if self.pooled_name else None,
            truncated=tokens.truncated,
        )
