"""Qwen-Image's text encoder (Qwen2.5-VL, language model only): the graph, a tiny build, checkpoint names.

``QwenImagePipeline`` conditions on ``hidden_states[-1]`` of ``Qwen2_5_VLForConditionalGeneration`` called on
the templated prompt without images. For text alone the vision tower never runs and the three M-RoPE position
rows are all ``arange(sequence_length)``, so the graph is the text model ``model.language_model``
(``Qwen2_5_VLTextModel``) alone: its last hidden state (after the final norm) is ``hidden_states[-1]``. The
engine encodes one prompt at a time, unpadded, so the attention mask diffusers passes is all ones and the graph
takes none (plain causal attention).

The tiny tokenizer and encoder are deterministic builds for the tests (no download): a byte-level BPE with
Qwen2's pre-tokenizer and special tokens, trained on a built-in corpus so that the pipeline's template prefix
is 34 tokens, as with the real tokenizer (``prompt_template_encode_start_idx``).

Storing the 7B encoder smaller: its embedding table (152064 x 3584, 2.2 GB in fp32) is a Gather, not a MatMul,
so the int8/int4 MatMulNBits formats leave it in fp32. Rows are only gathered, so it could be stored bf16/fp16
(halved, with a Cast after the Gather: exact for the bf16 checkpoint) or row-wise int8 with one scale per row
(a quarter; ``GatherBlockQuantized`` in ONNX Runtime's contrib ops, or Gather + DequantizeLinear per axis).
"""

from __future__ import annotations

import numpy as np

from ..components import Component, _stable_seed, _wrapper

KIND = "qwen2.5-vl-text"
ENCODER_CLASSES = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLTextModel")

# QwenImagePipeline's template (diffusers 0.39) and the tokens of its prefix the pipeline drops
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
PROMPT_TEMPLATE_START_IDX = 34
TOKENIZER_MAX_LENGTH = 1024
MAX_SEQUENCE_LENGTH = 512

# transformers' Qwen2Converter pre-tokenizer (what Qwen/Qwen-Image's tokenizer.json holds)
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TINY_VOCAB = 1000

# The tiny tokenizer's training text: the template's words many times (so each becomes one token, as in
# Qwen's vocabulary), plus prompts in the style of the tests'. Fixed: the vocabulary depends on nothing else.
_CORPUS_PROMPTS = (
    "a cat holding a sign that says hello world",
    "A photo of a red fox sitting in the snow at sunrise, 4k, highly detailed.",
    "an astronaut riding a horse on the moon, digital art",
    "A cozy wooden cabin in a pine forest, warm light in the windows, evening fog.",
    "Portrait of an old fisherman with a grey beard and a blue knitted hat, oil painting.",
    "a bowl of ramen with two eggs, green onions and chopsticks on a dark table",
    "The city skyline at night reflected in the river; neon signs, rain, cinematic.",
    "Three small robots playing chess in a library full of tall bookshelves!",
    "A watercolor map of an island with mountains, a lighthouse and sailing boats",
    "close-up of a hummingbird drinking from a pink flower, shallow depth of field",
    "Poster with the words 'Summer Festival 2025' in bold yellow letters over a beach.",
    "a glass teapot on a white marble counter next to lemons and fresh mint leaves",
    "A futuristic train crossing a desert bridge under two suns, wide angle shot.",
    "children flying kites on a green hill, clouds, spring, bright and cheerful colors",
    "Isometric 3D render of a tiny bakery with bread, cakes and a striped awning.",
)


def tiny_tokenizer():
    """A deterministic ``Qwen2TokenizerFast`` (~1000 tokens) built with the `tokenizers` library, no download."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import Qwen2TokenizerFast

    tokenizer = Tokenizer(
        BPE(
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = BpeTrainer(
        vocab_size=TINY_VOCAB,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: any text encodes, no unknown token
        special_tokens=list(SPECIAL_TOKENS),
    )
    template_text = "\n".join(PROMPT_TEMPLATE.replace("{}", " ").split("<|im_end|>")).replace("<|im_start|>", "\n")
    corpus = [template_text] * 50 + [p for _ in range(3) for p in _CORPUS_PROMPTS]
    tokenizer.train_from_iterator(corpus, trainer)
    return Qwen2TokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=131072,  # Qwen/Qwen-Image's tokenizer_config.json
        clean_up_tokenization_spaces=False,
    )


def tiny_text_encoder(seed: int = 0, vocab_size: int | None = None):
    """A tiny ``Qwen2_5_VLForConditionalGeneration`` (2 layers, hidden 64, GQA 4/2 heads, M-RoPE), fp32, eval."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vocab = int(vocab_size or len(tiny_tokenizer()))
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6,
            # head_dim 16: the sections cover its 8 frequencies (Qwen2.5-VL-7B: [16, 24, 24] of 64)
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": 64,
            "patch_size": 2,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 4,
            "fullatt_block_indexes": [0],
        },
        vocab_size=vocab,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()


# --- the graph ---------------------------------------------------------------------------------------------

# (batch, sequence length) per case: traced at "export", validated at "a" and "b" (capped at max_length)
QWEN_TEXT_CASES = {"export": (2, 41), "a": (1, 64), "b": (2, 13)}


def language_model(module):
    """The text model of a Qwen2.5-VL encoder (the module itself when it already is one)."""
    if type(module).__name__ == "Qwen2_5_VLTextModel":
        return module
    return module.model.language_model


def _forward(model, input_ids):
    out = model(input_ids=input_ids, use_cache=False, return_dict=True)
    return (out.last_hidden_state,)  # after the final norm: hidden_states[-1]


def _traceable_rope(rope) -> None:
    """Give ``rope`` (a ``Qwen2_5_VLRotaryEmbedding``) a forward without the ``torch.autocast`` block of
    transformers' one, which cannot be entered on the meta device the streaming exporter traces on; the
    arithmetic is the same, in fp32 (what the autocast-disabled block computes on the CPU). Only the meta
    module being traced gets it: validation compares the graph with transformers' own forward."""
    import types

    import torch

    if getattr(rope, "rope_type", "default") != "default":
        raise TypeError(f"no ONNX export for Qwen2.5-VL rope type {rope.rope_type!r}")

    def forward(self, x, position_ids):
        inv_freq = self.inv_freq[None, None, :, None].float().expand(3, position_ids.shape[1], -1, 1)
        positions = position_ids[:, :, None, :].float()  # (3, batch, 1, tokens)
        freqs = (inv_freq @ positions).transpose(2, 3)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)

    rope.forward = types.MethodType(forward, rope)


def _wrapper_class():
    """The traced module around the text model (built when first needed: it imports torch)."""
    global _WRAPPER
    if _WRAPPER is None:

        class QwenTextWrapper(_wrapper(_forward)):
            def __init__(self, module):
                super().__init__(module)
                if any(p.is_meta for p in module.parameters()):  # the trace; PyTorch references keep theirs
                    _traceable_rope(module.rotary_emb)

        _WRAPPER = QwenTextWrapper
    return _WRAPPER


_WRAPPER = None


def text_encoder_component(name: str, module, max_length: int) -> Component:
    """Qwen2.5-VL's language model as the graph ``input_ids`` → ``last_hidden_state`` (kind qwen2.5-vl-text).

    ``module``: the ``Qwen2_5_VLForConditionalGeneration`` (or its ``Qwen2_5_VLTextModel``); the Component's
    module is the text model, whose parameter names are ``embed_tokens.*``, ``layers.N.*``, ``norm.*``
    (``checkpoint_remap`` finds them in a checkpoint)."""
    text = language_model(module)
    vocab = int(text.config.vocab_size)
    batch_seq = {0: "batch_size", 1: "sequence_length"}

    def make_inputs(case: str) -> dict[str, np.ndarray]:
        batch, seq = QWEN_TEXT_CASES[case]
        seq = max(2, min(seq, int(max_length)))
        rng = np.random.default_rng(_stable_seed(name, case))
        return {"input_ids": rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)}

    return Component(
        name=name,
        kind=KIND,
        module=text,
        inputs={"input_ids": dict(batch_seq)},
        outputs={"last_hidden_state": dict(batch_seq)},
        make_inputs=make_inputs,
        wrapper=_wrapper_class()(text).eval(),
        rebuild=lambda other: text_encoder_component(name, other, max_length),
    )


# --- checkpoint names --------------------------------------------------------------------------------------

# Where the text model's parameters sit in a checkpoint: Qwen/Qwen-Image's text_encoder/ and transformers'
# save_pretrained write ``model.layers.0...`` (the older naming); the module tree of transformers >= 4.52 is
# ``model.language_model.layers.0...``; a text model saved alone has no prefix; a Qwen2_5_VLModel ``language_model.``
CHECKPOINT_PREFIXES = ("model.", "model.language_model.", "", "language_model.")


def checkpoint_name(name: str, keys) -> str | None:
    """The checkpoint name of the text model's parameter ``name`` (``keys``: anything with ``in``), or None."""
    for prefix in CHECKPOINT_PREFIXES:
        if prefix + name in keys:
            return prefix + name
    return None


def checkpoint_remap(checkpoint):
    """``remap`` for ``streaming.fetch``/``write``/``export``: exported parameter name → the name ``checkpoint``
    (SafetensorsWeights, ModuleWeights, a dict of names) holds it under, old or new naming. A name it lacks
    is returned as it is, so fetch reports it missing."""

    def remap(name: str) -> str:
        return checkpoint_name(name, checkpoint) or name

    return remap


class TextWeights:
    """A Qwen2.5-VL checkpoint seen under the text model's parameter names: what ``streaming.export`` and
    ``reduced.check`` read when given it in place of the checkpoint (no remap to thread through)."""

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint
        self._remap = checkpoint_remap(checkpoint)

    def __contains__(self, name: str) -> bool:
        return checkpoint_name(name, self.checkpoint) is not None

    def params(self) -> int:
        return self.checkpoint.params()

    def array(self, name: str) -> np.ndarray:
        return self.checkpoint.array(self._remap(name))

    def close(self) -> None:
        self.checkpoint.close()
