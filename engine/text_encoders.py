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
        # a graph that takes the mask gets it (DeepFloyd IF's T5); the others ignore it
        out = self.graph(outputs=wanted, input_ids=tokens.ids, attention_mask=tokens.mask)
        return Encoded(
            last_hidden=out["last_hidden_state"],
            penultimate=out.get(self.penultimate_name) if self.penultimate_name else None,
            pooled=out.get(self.pooled_name) if self.pooled_name else None,
            truncated=tokens.truncated,
        )


class QwenTextEncoder:
    """Qwen-Image's prompt embeds: ``QwenImagePipeline.encode_prompt(prompt)`` for one prompt.

    The prompt is put in ``template`` (the pipeline's ``prompt_template_encode``), tokenized without padding and
    truncated at ``tokenizer.max_length`` (the pipeline's ``tokenizer_max_length + drop``: 1024 + 34), run through
    the language-model graph (``input_ids`` → ``last_hidden_state``, the model's ``hidden_states[-1]``); the
    template's first ``drop`` tokens (``prompt_template_encode_start_idx``) are dropped and at most
    ``max_sequence_length`` (512, what the pipeline's ``__call__`` passes) are kept. ``truncated``: the
    tokenizer or the ``max_sequence_length`` cut dropped tokens (of the prompt, or of the template's closing
    ``<|im_end|>\n<|im_start|>assistant\n`` after it)."""

    def __init__(self, graph: Graph, tokenizer: PromptTokenizer, template: str, drop: int, max_sequence_length: int):
        if "{}" not in template:
            raise ValueError("the prompt template has no {} for the prompt")
        self.graph, self.tokenizer = graph, tokenizer
        self.template, self.drop = template, int(drop)
        self.max_sequence_length = int(max_sequence_length)
        self.max_length = self.max_sequence_length  # the prompt's window, as a truncation warning names it

    def __call__(self, text: str) -> Encoded:
        tokens = self.tokenizer(self.template.format(text))
        hidden = self.graph(outputs=["last_hidden_state"], input_ids=tokens.ids)["last_hidden_state"]
        embeds = hidden[:, self.drop :]
        cut = embeds.shape[1] > self.max_sequence_length
        embeds = np.ascontiguousarray(embeds[:, : self.max_sequence_length])
        return Encoded(last_hidden=embeds, penultimate=None, pooled=None, truncated=tokens.truncated or cut)
