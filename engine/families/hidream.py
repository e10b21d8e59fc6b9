"""HiDream-I1 (Full, Dev, Fast): a sparse flow MMDiT over 2x2 latent patches, conditioned on four encoders.

As diffusers 0.39's HiDreamImagePipeline does it:
- the requested size is rescaled to the area of ``default_sample_size`` latent pixels a side (1024² for the real
  model), keeping the aspect ratio, each side floored to a multiple of 16 (``image_size``);
- prompts are padded to 128 tokens in all four tokenizers (CLIPs' ``min(128, 218)``); the pooled condition is
  CLIP-L's and CLIP-G's ``text_embeds`` side by side, T5 and Llama get the attention mask, and Llama gives
  every layer's states (layers, batch, 128, 4096);
- with CFG (Full) the negative prompt ("" when none is given) is encoded the same way and put first: T5 and
  pooled on the batch axis, Llama's layers on their batch axis (1);
- the latents stay (1, 16, h, w) for the scheduler; the transformer takes them as patch tokens (square latents:
  h*w/4 tokens; others zero-padded to ``max_seq`` with a key mask, which changes the numbers: diffusers' padding),
  its raw timestep, and its output is negated before guidance;
- the scheduler is the export's (Full: flow UniPC, Dev/Fast: flow-match Euler) with its own timesteps
  (``set_timesteps(steps)``: no pipeline sigmas, no dynamic shift).
"""

from __future__ import annotations

import math

import numpy as np

from ..text_encoders import TextEncoder
from ..tokenize import Tokens
from .base import Architecture, classifier_free_guidance, encode_text

MAX_SEQUENCE_LENGTH = 128
DEFAULT_SAMPLE_SIZE = 128  # HiDreamImagePipeline.__init__'s default_sample_size
PATCH = 2


def patch_tokens(latents: np.ndarray, patch: int, max_seq: int):
    """``HiDreamImageTransformer2DModel.patchify`` in numpy: (tokens (B, S, p*p*C), key mask (B, S), ids (S, 3))
    with S = h*w/p^2 for a square latent and ``max_seq`` (zero-padded, the mask 0 there) otherwise."""
    b, c, h, w = latents.shape
    ph, pw = h // patch, w // patch
    n = ph * pw
    seq = n if h == w else max_seq
    if seq < n:
        raise ValueError(f"a {w}x{h} latent has {n} tokens, more than the transformer's {max_seq}")
    tokens = np.zeros((b, seq, patch * patch * c), dtype=np.float32)
    x = latents.reshape(b, c, ph, patch, pw, patch).transpose(0, 2, 4, 3, 5, 1)
    tokens[:, :n] = x.reshape(b, n, patch * patch * c)
    mask = np.zeros((b, seq), dtype=np.float32)
    mask[:, :n] = 1.0
    ids = np.zeros((seq, 3), dtype=np.float32)
    ids[:n, 1] = np.repeat(np.arange(ph), pw)
    ids[:n, 2] = np.tile(np.arange(pw), ph)
    return tokens, mask, ids


def unpatch_tokens(tokens: np.ndarray, patch: int, height: int, width: int) -> np.ndarray:
    """``unpatchify`` (its inference branch) in numpy: the first h*w/p^2 tokens back to (B, C, h, w)."""
    b = tokens.shape[0]
    ph, pw = height // patch, width // patch
    c = tokens.shape[-1] // (patch * patch)
    t = tokens[:, : ph * pw].reshape(b, ph, pw, patch, patch, c)
    return np.ascontiguousarray(t.transpose(0, 5, 1, 3, 2, 4).reshape(b, c, ph * patch, pw * patch))


class MaskedEncoder:
    """T5 or Llama as HiDream calls them: ids and the attention mask of the real tokens."""

    def __init__(self, graph, tokenizer, output: str):
        self.graph, self.tokenizer, self.output = graph, tokenizer, output
        self.max_length = tokenizer.max_length

    def __call__(self, text: str):
        tokens: Tokens = self.tokenizer(text)
        out = self.graph(outputs=[self.output], input_ids=tokens.ids, attention_mask=tokens.mask)[self.output]
        return _Encoded(np.asarray(out, dtype=np.float32), tokens.truncated)


class _Encoded:
    def __init__(self, states, truncated):
        self.last_hidden, self.truncated = states, truncated


class HiDreamArchitecture(Architecture):
    components = {
        "text_encoder": True,
        "text_encoder_2": True,
        "text_encoder_3": True,
        "text_encoder_4": True,
        "transformer": True,
    }
    denoiser_component = "transformer"

    def __init__(self, manifest):
        super().__init__(manifest)
        config = self.config
        self.sequence_length = int(config.get("max_sequence_length") or MAX_SEQUENCE_LENGTH)
        self.clip_length = int(config.get("clip_max_length") or min(self.sequence_length, 218))
        self.default_sample_size = int(config.get("default_sample_size") or DEFAULT_SAMPLE_SIZE)
        self.patch = int(config.get("patch_size") or PATCH)
        self.max_seq = int(config["max_seq"])
        self.llama_states = int(config["llama_states"])

    def tokenizer_lengths(self) -> dict[str, int]:
        clip, seq = self.clip_length, self.sequence_length
        return {"tokenizer": clip, "tokenizer_2": clip, "tokenizer_3": seq, "tokenizer_4": seq}

    # --- size
    @property
    def image_scale_factor(self) -> int:
        return self.vae_scale_factor * 2

    def image_size(self, width: int, height: int) -> tuple[int, int]:
        """The size the pipeline generates at: the request rescaled to (default_sample_size x vae scale)², in the
        pipeline's float arithmetic."""
        division = self.vae_scale_factor * 2
        area = (self.default_sample_size * self.vae_scale_factor) ** 2
        scale = math.sqrt(area / (width * height))
        return int(width * scale // division * division), int(height * scale // division * division)

    def latent_shape(self, width: int, height: int) -> tuple[int, ...]:
        f = self.image_scale_factor
        return (1, self.latent_channels, 2 * (height // f), 2 * (width // f))

    # --- conditioning
    def _encode_one(self, graphs, tokenizers, text: str, warnings: list[str]):
        clips = [
            TextEncoder(graphs[n], tokenizers[t])
            for n, t in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
        ]
        t5 = MaskedEncoder(graphs["text_encoder_3"], tokenizers["tokenizer_3"], "last_hidden_state")
        llama = MaskedEncoder(graphs["text_encoder_4"], tokenizers["tokenizer_4"], "hidden_states")
        clip_l, clip_g, t5_out, llama_out = encode_text([*clips, t5, llama], text, warnings)
        pooled = np.concatenate([clip_l.pooled, clip_g.pooled], axis=-1)
        return t5_out.last_hidden, llama_out.last_hidden[: self.llama_states], pooled

    def encode(self, graphs, tokenizers, prompt, negative, guidance):
        """→ {"t5": (B, 128, D), "llama": (layers, B, 128, D'), "pooled": (B, 2 x projection)}, B 2 with CFG."""
        warnings: list[str] = []
        t5, llama, pooled = self._encode_one(graphs, tokenizers, prompt, warnings)
        if self.uses_cfg(guidance):
            n_t5, n_llama, n_pooled = self._encode_one(graphs, tokenizers, negative or "", warnings)
            t5 = np.concatenate([n_t5, t5], axis=0)
            llama = np.concatenate([n_llama, llama], axis=1)
            pooled = np.concatenate([n_pooled, pooled], axis=0)
        return {"t5": t5, "llama": np.ascontiguousarray(llama), "pooled": pooled}, warnings

    # --- the denoiser
    def denoiser(self, graph, cond, extra, guidance):
        batch = cond["t5"].shape[0]

        def denoise(x, t):
            _, _, h, w = x.shape
            sample = np.concatenate([x] * batch) if batch > 1 else x
            tokens, mask, ids = patch_tokens(sample, self.patch, self.max_seq)
            out = graph(
                outputs=["out_hidden_states"],
                hidden_states=tokens,
                hidden_states_masks=mask,
                img_ids=ids,
                timestep=self.timestep(t, batch),
                encoder_hidden_states_t5=cond["t5"],
                encoder_hidden_states_llama3=cond["llama"],
                pooled_embeds=cond["pooled"],
            )["out_hidden_states"]
            prediction = -unpatch_tokens(out, self.patch, h, w)
            return classifier_free_guidance(prediction, guidance) if batch > 1 else prediction

        return denoise
