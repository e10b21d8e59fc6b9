"""Qwen-Image's text encoder: the tiny tokenizer against transformers', the streamed ONNX language model run by
the engine's QwenTextEncoder against diffusers' ``QwenImagePipeline.encode_prompt``, and the checkpoint name map
against both namings of a Qwen2.5-VL checkpoint (transformers' save_pretrained and its module tree).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from engine.session import Graph  # noqa: E402
from engine.text_encoders import QwenTextEncoder  # noqa: E402
from engine.tokenize import PromptTokenizer  # noqa: E402
from exporters import components, streaming, validate  # noqa: E402
from exporters import qwen_image as qi  # noqa: E402

SHORT = "a cat holding a sign that says hello world"
# ~700 tokens: past max_sequence_length (512) after the template's 34, within the tokenizer's 1024 + 34
LONG = " ".join(["A photo of a red fox sitting in the snow at sunrise, highly detailed."] * 40)
# past the tokenizer's 1024 + 34: the pipeline truncates it
LONGEST = " ".join(["an astronaut riding a horse on the moon, digital art;"] * 150)
TEXTS = [
    SHORT,
    "  Poster with the words 'Summer Festival 2025' in BOLD letters!\n\n\tit's   spaced\r\nout  ",
    "Ünïcödé: café, 日本語の猫, emoji 🐱🚀, math ∑x² ≤ 1",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    return qi.tiny_tokenizer()


@pytest.fixture(scope="module")
def reference_pipe(tokenizer):
    """diffusers' own QwenImagePipeline around the tiny encoder and tokenizer (its prompt encoding only)."""
    encoder = qi.tiny_text_encoder(seed=0, vocab_size=len(tokenizer))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
    return diffusers.QwenImagePipeline(
        scheduler=scheduler, vae=None, text_encoder=encoder, tokenizer=tokenizer, transformer=None
    )


def _reference_embeds(pipe, prompt: str) -> np.ndarray:
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(prompt, device=torch.device("cpu"), max_sequence_length=512)
    return embeds.numpy()


# --- (a) the tokenizer ---------------------------------------------------------------------------------------


def test_tiny_tokenizer_drops_the_real_template_prefix(tokenizer, reference_pipe):
    template = reference_pipe.prompt_template_encode
    assert template == qi.PROMPT_TEMPLATE
    prefix = template[: template.index("{}")]
    ids = tokenizer(prefix).input_ids
    # what Qwen's own tokenizer gives: each word, comma and newline one token
    assert len(ids) == reference_pipe.prompt_template_encode_start_idx == qi.PROMPT_TEMPLATE_START_IDX == 34
    assert tokenizer.convert_ids_to_tokens(ids)[:5] == ["<|im_start|>", "system", "Ċ", "Describe", "Ġthe"]
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert 500 <= len(tokenizer) <= 1100
    assert qi.tiny_tokenizer().get_vocab() == tokenizer.get_vocab()  # deterministic


def test_engine_tokenizer_matches_transformers_unpadded(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    max_length = qi.TOKENIZER_MAX_LENGTH + qi.PROMPT_TEMPLATE_START_IDX
    ours = PromptTokenizer(tmp_path, max_length=max_length, pad=False)
    for text in [*TEXTS, LONG, LONGEST]:
        prompt = qi.PROMPT_TEMPLATE.format(text)
        expected = tokenizer(prompt, max_length=max_length, truncation=True).input_ids
        got = ours(prompt)
        assert got.ids.dtype == np.int64 and got.ids.shape == (1, len(expected))
        assert got.ids[0].tolist() == expected, text[:40]
        full = len(tokenizer(prompt).input_ids)
        assert got.truncated == (full > max_length)
    assert ours(qi.PROMPT_TEMPLATE.format(LONGEST)).truncated
    # the padded mode the other families use is unchanged
    padded = PromptTokenizer(tmp_path, max_length=77)(SHORT)
    assert padded.ids.shape == (1, 77) and padded.ids[0, -1] == tokenizer.pad_token_id


def test_engine_tokenizer_matches_the_slow_tokenizer_diffusers_loads(tokenizer, tmp_path):
    """QwenImagePipeline loads the slow ``Qwen2Tokenizer`` (model_index.json); Qwen/Qwen-Image ships its
    vocab.json + merges.txt. The exporter's save_tokenizer converts it; the engine reads the conversion."""
    from exporters.main import save_tokenizer

    tokenizer.save_pretrained(tmp_path / "hub")
    (tmp_path / "hub" / "tokenizer.json").unlink()  # the slow files only
    slow = transformers.Qwen2Tokenizer.from_pretrained(tmp_path / "hub")
    assert not slow.is_fast
    save_tokenizer(slow, tmp_path / "export")
    max_length = qi.TOKENIZER_MAX_LENGTH + qi.PROMPT_TEMPLATE_START_IDX
    ours = PromptTokenizer(tmp_path / "export", max_length=max_length, pad=False)
    for text in [*TEXTS, LONGEST]:
        prompt = qi.PROMPT_TEMPLATE.format(text)
        assert ours(prompt).ids[0].tolist() == slow(prompt, max_length=max_length, truncation=True).input_ids


# --- (b) the streamed graph through the engine against diffusers ------------------------------------------------


@pytest.fixture(scope="module")
def exported(reference_pipe, tmp_path_factory):
    """The text encoder saved as the hub ships it (save_pretrained: model.layers.*), traced on the meta device
    and written from those safetensors by the streaming exporter."""
    root = tmp_path_factory.mktemp("qwen-text")
    encoder = reference_pipe.text_encoder
    encoder.save_pretrained(root / "checkpoint", safe_serialization=True)
    component = components.text_encoder("text_encoder", encoder, qi.TOKENIZER_MAX_LENGTH + 34)
    path = root / "text_encoder" / "model.onnx"
    checkpoint = qi.TextWeights(streaming.SafetensorsWeights(root / "checkpoint"))
    streaming.export(component, checkpoint, path, opset=17, fmt="fp32")
    reference_pipe.tokenizer.save_pretrained(root / "tokenizer")
    return component, path, root / "tokenizer"


@pytest.mark.slow
def test_component_is_the_streamed_language_model(exported):
    component, path, _ = exported
    assert component.kind == qi.TEXT_KIND == "qwen2.5-vl-text"
    assert type(component.module).__name__ == "Qwen2_5_VLTextModel" and streaming.streams(component.module)
    result = validate.validate(component, path)  # two shapes, neither the traced one
    assert result["max_abs_diff"] <= 1e-4
    assert [s["input_ids"] for s in result["shapes"]] == [[1, 64], [2, 13]]
    # the reference is transformers' own module: the meta-safe rope forward is the traced copy's alone
    assert "forward" not in vars(component.module.rotary_emb)


@pytest.mark.slow
def test_reduced_depth_validation_reads_the_checkpoint_through_the_name_map(exported, tmp_path, monkeypatch):
    """How the 7B encoder (28 GB in fp32) is validated: its first layer + embeddings + norm, read from the
    hub-named checkpoint through TextWeights, exported again and compared with transformers."""
    from exporters import reduced

    component, path, _ = exported
    monkeypatch.setattr(streaming, "FULL_VALIDATION_BYTES", 0)
    checkpoint = qi.TextWeights(streaming.SafetensorsWeights(path.parent.parent / "checkpoint"))
    result = reduced.check(component, checkpoint, path, opset=17, fmt="fp32", tolerances={})
    assert result["compared"].startswith("reduced depth: layers [0] of 2")
    assert result["max_abs_diff"] <= result["tolerance"]


@pytest.mark.slow
@pytest.mark.parametrize("prompt", [SHORT, TEXTS[2], LONG, LONGEST], ids=["short", "unicode", "long", "longest"])
def test_engine_prompt_embeds_match_diffusers(exported, reference_pipe, prompt):
    _, path, tokenizer_folder = exported
    drop = reference_pipe.prompt_template_encode_start_idx
    tokenizer = PromptTokenizer(tokenizer_folder, max_length=reference_pipe.tokenizer_max_length + drop, pad=False)
    encoder = QwenTextEncoder(Graph(path), tokenizer, reference_pipe.prompt_template_encode, drop, 512)
    got = encoder(prompt)
    expected = _reference_embeds(reference_pipe, prompt)
    assert got.last_hidden.shape == expected.shape
    np.testing.assert_allclose(got.last_hidden, expected, rtol=0, atol=1e-4)
    assert got.truncated == (prompt in (LONG, LONGEST))
    if prompt in (LONG, LONGEST):
        assert expected.shape[1] == 512


# --- (c) checkpoint names ------------------------------------------------------------------------------------


def test_name_map_finds_every_exported_parameter_in_both_namings(reference_pipe, tmp_path):
    from safetensors.torch import save_file

    encoder = reference_pipe.text_encoder
    old = tmp_path / "old"
    encoder.save_pretrained(old, safe_serialization=True)  # model.layers.*, visual.*, lm_head.*
    new = tmp_path / "new"
    new.mkdir()
    state = {k: v.contiguous() for k, v in encoder.state_dict().items()}  # the module tree: model.language_model.*
    save_file(state, str(new / "model.safetensors"))

    text_cls = type(qi.language_model(encoder))
    module, buffers = streaming.build(text_cls, qi.language_model(encoder).config)
    wanted = [name for name in module.state_dict() if name not in buffers]
    assert "embed_tokens.weight" in wanted and "layers.1.self_attn.q_proj.bias" in wanted
    truth = qi.language_model(encoder).state_dict()
    seen = {}
    for folder in (old, new):
        checkpoint = streaming.SafetensorsWeights(folder)
        seen[folder.name] = any(k.startswith("model.language_model.") for k in checkpoint.keys())
        remap = qi.checkpoint_remap(checkpoint)
        names = streaming.aliases(module)
        weights = qi.TextWeights(checkpoint)
        for name in wanted:
            assert remap(name) in checkpoint, (folder.name, name)
            value = streaming.fetch(name, checkpoint, buffers, names, remap)
            np.testing.assert_array_equal(value, truth[name].numpy())
            assert name in weights
            np.testing.assert_array_equal(weights.array(name), value)
    assert seen == {"old": False, "new": True}  # the two namings really differ
    assert qi.checkpoint_name("layers.0.mlp.up_proj.weight", {"visual.blocks.0.mlp.up_proj.weight"}) is None
