"""HiDream-I1's T5 (with its mask) and Llama-3.1 (every layer's states) as graphs, against the pipeline's own
``_get_t5_prompt_embeds`` / ``_get_llama3_prompt_embeds`` on the tiny pipeline, with the tokenization the
engine will do (padded to 128, the mask of the real tokens)."""

import numpy as np
import pytest
import torch

from exporters import tiny, validate
from exporters.hidream import text

# fp32 graphs against PyTorch: reordering only
ATOL = 1e-5
PROMPTS = ["a cat holding a sign that says hello world", "an astronaut riding a horse on the moon, digital art"]


@pytest.fixture(scope="module")
def pipe():
    return tiny.build("hidream-i1")


@pytest.fixture(scope="module")
def graphs(exported_tiny):
    """The graphs of the tiny export (validated against PyTorch at export, at two other shapes)."""
    folder = exported_tiny("hidream-i1", weights="fp32", text_encoder_weights="fp32")
    return {name: validate.session(folder / name / "model.onnx") for name in ("text_encoder_3", "text_encoder_4")}


def _tokens(tokenizer, prompt):
    enc = tokenizer(prompt, padding="max_length", max_length=128, truncation=True, return_tensors="np")
    return enc.input_ids.astype(np.int64), enc.attention_mask.astype(np.int64)


def test_tiny_llama_tokenizer_is_llama3_shaped(pipe):
    tok = pipe.tokenizer_4
    ids = tok(PROMPTS[0]).input_ids
    assert ids[0] == tok.convert_tokens_to_ids(text.BOS)  # the post-processor prepends <|begin_of_text|>
    assert tok.pad_token == text.EOT  # the pipeline pads with the eos token
    assert len(tok(PROMPTS[0]).input_ids) < 30  # merges learned: not one token per byte


@pytest.mark.parametrize("prompt", PROMPTS)
def test_llama_graph_equals_pipeline_llama3_embeds(pipe, graphs, prompt):
    with torch.no_grad():
        reference = pipe._get_llama3_prompt_embeds([prompt], 128, torch.device("cpu"), torch.float32).numpy()
    ids, mask = _tokens(pipe.tokenizer_4, prompt)
    assert 0 < mask.sum() < 128  # padded, so the mask matters
    (ours,) = graphs["text_encoder_4"].run(None, {"input_ids": ids, "attention_mask": mask})
    assert ours.shape == reference.shape == (3, 1, 128, 48)  # every layer but the embeddings
    np.testing.assert_allclose(ours, reference, rtol=0, atol=ATOL)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_t5_graph_with_mask_equals_pipeline_t5_embeds(pipe, graphs, prompt):
    with torch.no_grad():
        reference = pipe._get_t5_prompt_embeds([prompt], 128, torch.device("cpu"), torch.float32).numpy()
    ids, mask = _tokens(pipe.tokenizer_3, prompt)
    (ours,) = graphs["text_encoder_3"].run(None, {"input_ids": ids, "attention_mask": mask})
    np.testing.assert_allclose(ours, reference, rtol=0, atol=ATOL)
    # the mask is what makes it equal: without it, the padding is attended and the states differ
    (unmasked,) = graphs["text_encoder_3"].run(None, {"input_ids": ids, "attention_mask": np.ones_like(mask)})
    assert np.abs(unmasked - reference).max() > 1e-3
