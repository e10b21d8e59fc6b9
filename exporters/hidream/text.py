"""HiDream-I1's text encoders beyond SD 3's: T5 with its attention mask, and Llama-3.1's every layer.

``HiDreamImagePipeline`` pads both prompts to ``max_sequence_length`` (128) and passes the attention mask:
- T5 (``_get_t5_prompt_embeds``): ``text_encoder_3(ids, attention_mask=mask)[0]``; the mask changes the states
  of every token (padding is not attended), so its graph takes it (components.text_encoder's masked T5, IF's).
- Llama (``_get_llama3_prompt_embeds``): ``text_encoder_4(ids, attention_mask=mask, output_hidden_states=True)
  .hidden_states[1:]`` stacked: every decoder layer's output (the last one after the final norm), not the
  embeddings. ``LlamaForCausalLM``'s head is never used, so the graph is its ``model`` (``LlamaModel``), output
  ``hidden_states`` (layers, batch, tokens, hidden) as the pipeline stacks them.

The tiny Llama-3 tokenizer is built in code (no download): a byte-level BPE with Llama-3's pre-tokenizer and
special tokens, ``<|begin_of_text|>`` prepended as the real tokenizer's post-processor does, trained on a fixed
corpus. The pipeline sets its pad token to the eos token (``<|eot_id|>`` for the Instruct tokenizer).
"""

from __future__ import annotations

import numpy as np

from ..components import Component, _stable_seed, _wrapper

LLAMA_KIND = "llama-hidden-states"
MAX_SEQUENCE_LENGTH = 128  # HiDreamImagePipeline.__call__'s max_sequence_length: T5's and Llama's window
CLIP_MAX_LENGTH = 128  # _get_clip_prompt_embeds: min(max_sequence_length, 218)

# transformers' Llama-3 (tiktoken) pre-tokenizer pattern, as meta-llama/Llama-3.1-8B-Instruct's tokenizer.json
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
TINY_VOCAB = 600

_CORPUS = (
    "a cat holding a sign that says hello world",
    "A photo of a red fox sitting in the snow at sunrise, 4k, highly detailed.",
    "an astronaut riding a horse on the moon, digital art",
    "A cozy wooden cabin in a pine forest, warm light in the windows, evening fog.",
    "Portrait of an old fisherman with a grey beard and a blue knitted hat, oil painting.",
    "The city skyline at night reflected in the river; neon signs, rain, cinematic.",
    "Poster with the words 'Summer Festival 2025' in bold yellow letters over a beach.",
    "children flying kites on a green hill, clouds, spring, bright and cheerful colors",
)


def tiny_llama_tokenizer():
    """A deterministic Llama-3-style ``PreTrainedTokenizerFast`` (~600 tokens), built with `tokenizers`."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=TINY_VOCAB,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[BOS, EOS, EOT],
    )
    tokenizer.train_from_iterator([p for _ in range(3) for p in _CORPUS], trainer)
    bos = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos)]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOT,  # Llama-3.1-8B-Instruct's tokenizer_config.json
        model_max_length=131072,
        clean_up_tokenization_spaces=True,
    )


def tiny_llama(seed: int, vocab_size: int):
    """A tiny ``LlamaForCausalLM`` (3 layers, hidden 48, GQA 4/2 heads), fp32, eval."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=131072,  # Llama-3.1's (rotary: no table of that size)
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        # Llama-3.1's frequency scaling (meta-llama/Llama-3.1-8B-Instruct's config.json)
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(torch.float32).eval()


# (batch, tokens) per case: traced at "export", validated at "a" and "b"
TEXT_CASES = {"export": (2, 20), "a": (1, MAX_SEQUENCE_LENGTH), "b": (2, 13)}


def _masked_inputs(name: str, vocab: int, case: str, first: int = 0) -> dict[str, np.ndarray]:
    """Right-padded prompts: a mask of ones then zeros, a different length per row."""
    batch, seq = TEXT_CASES[case]
    rng = np.random.default_rng(_stable_seed(name, case))
    ids = rng.integers(first, vocab, size=(batch, seq), dtype=np.int64)
    mask = np.zeros((batch, seq), dtype=np.int64)
    for row in range(batch):
        mask[row, : int(rng.integers(2, seq + 1))] = 1
    return {"input_ids": ids, "attention_mask": mask}


def language_model(module):
    """The ``LlamaModel`` of a ``LlamaForCausalLM`` (the module itself when it already is one)."""
    return module.model if type(module).__name__ == "LlamaForCausalLM" else module


def _llama_forward(model, input_ids, attention_mask):
    """The 4-D mask transformers builds from a 2-D one (causal, padding keys excluded), built here: its own
    builder vmaps a padding lookup that TorchScript cannot trace; a 4-D mask is used as given."""
    import torch

    seq = input_ids.shape[1]
    positions = torch.arange(seq, device=input_ids.device)
    causal = positions[None, :] <= positions[:, None]  # (query, key)
    allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
    out = model(input_ids=input_ids, attention_mask=allowed, output_hidden_states=True, use_cache=False)
    return (torch.stack(out.hidden_states[1:], dim=0),)


def _traceable_rope(rope) -> None:
    """Give ``rope`` (a ``LlamaRotaryEmbedding``) a forward without the ``torch.autocast`` block of transformers'
    one, which cannot be entered on the meta device the streaming exporter traces on; the same arithmetic in
    fp32. Llama-3.1's "llama3" scaling only changes ``inv_freq`` (a buffer, computed once), not the forward.
    Only the meta module being traced gets it: validation compares with transformers' own forward."""
    import types

    import torch

    if getattr(rope, "rope_type", "default") not in ("default", "llama3"):
        raise TypeError(f"no ONNX export for Llama rope type {rope.rope_type!r}")

    def forward(self, x, position_ids):
        inv_freq = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        freqs = (inv_freq @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)

    rope.forward = types.MethodType(forward, rope)


_LLAMA_WRAPPER = None


def _llama_wrapper_class():
    """The traced module around the Llama model (built when first needed: it imports torch)."""
    global _LLAMA_WRAPPER
    if _LLAMA_WRAPPER is None:

        class LlamaStatesWrapper(_wrapper(_llama_forward)):
            def __init__(self, module):
                super().__init__(module)
                if any(p.is_meta for p in module.parameters()):  # the streamed trace
                    _traceable_rope(module.rotary_emb)

        _LLAMA_WRAPPER = LlamaStatesWrapper
    return _LLAMA_WRAPPER


def llama_component(name: str, module) -> Component:
    model = language_model(module)
    vocab = int(model.config.vocab_size)
    return Component(
        name=name,
        kind=LLAMA_KIND,
        module=model,
        inputs={
            "input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "sequence_length"},
        },
        outputs={"hidden_states": {1: "batch_size", 2: "sequence_length"}},
        make_inputs=lambda case: _masked_inputs(name, vocab, case),
        wrapper=_llama_wrapper_class()(model).eval(),
        rebuild=lambda other: llama_component(name, other),
    )


class LlamaWeights:
    """A ``LlamaForCausalLM`` checkpoint (``model.layers.0...``, ``lm_head``) seen under its ``LlamaModel``'s
    names (``layers.0...``): what ``streaming.export`` and ``reduced.check`` read. A name it lacks is looked up
    as it is, so a ``LlamaModel`` saved alone reads too, and a missing one is reported missing."""

    PREFIXES = ("model.", "")

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint

    def _name(self, name: str) -> str:
        return next((p + name for p in self.PREFIXES if p + name in self.checkpoint), name)

    def __contains__(self, name: str) -> bool:
        return self._name(name) in self.checkpoint

    def params(self) -> int:
        return self.checkpoint.params()

    def array(self, name: str) -> np.ndarray:
        return self.checkpoint.array(self._name(name))

    def close(self) -> None:
        self.checkpoint.close()
