"""SD 3 / 3.5: an MMDiT conditioned on CLIP-L + CLIP-G (penultimate states, pooled) and T5, with CFG.

As StableDiffusion3Pipeline builds it: the CLIP states are concatenated on the feature axis, zero-padded to
T5's width and stacked before T5's tokens on the sequence axis. Without T5 (to save memory) its place is
zeros of the T5 window's length (max_sequence_length), as diffusers 0.39 does when text_encoder_3 is None.
"""

from __future__ import annotations

import numpy as np

import schedulers

from ..text_encoders import TextEncoder
from .base import Family, classifier_free_guidance


class SD3Family(Family):
    components = {"text_encoder": True, "text_encoder_2": True, "text_encoder_3": False, "transformer": True}
    denoiser_component = "transformer"

    def __init__(self, *args):
        super().__init__(*args)
        self.clip = [
            TextEncoder(self.graphs[n], self.tokenizers[t])
            for n, t in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
        ]
        self.t5 = (
            TextEncoder(self.graphs["text_encoder_3"], self.tokenizers["tokenizer_3"])
            if "text_encoder_3" in self.graphs
            else None
        )
        self.transformer = self.graphs["transformer"]
        self.joint_dim = int(self.config["joint_attention_dim"])
        self.t5_length = self.tokenizer_lengths(self.config)["tokenizer_3"]
        self.patch_size = int(self.config.get("patch_size", 2))

    @staticmethod
    def tokenizer_lengths(config: dict) -> dict[str, int]:
        return {"tokenizer_3": int(config.get("max_sequence_length") or 256)}  # the pipeline's default

    def _encode_one(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        states, pooled = [], []
        for encoder in self.clip:
            out = encoder(text)
            self._note_truncation(encoder, out.truncated)
            states.append(out.penultimate)
            pooled.append(out.pooled)
        clip = np.concatenate(states, axis=-1)
        if self.t5 is not None:
            out = self.t5(text)
            self._note_truncation(self.t5, out.truncated)
            t5 = out.last_hidden
        else:
            t5 = np.zeros((1, self.t5_length, self.joint_dim), dtype=np.float32)
        clip = np.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
        return np.concatenate([clip, t5], axis=1), np.concatenate(pooled, axis=-1)

    def encode(self, prompt: str, negative: str, guidance: float) -> dict:
        embeds, pooled = self._encode_one(prompt)
        if self.uses_cfg(guidance):
            neg, neg_pooled = self._encode_one(negative)
            embeds, pooled = np.concatenate([neg, embeds]), np.concatenate([neg_pooled, pooled])
        return {"embeds": embeds, "pooled": pooled}

    def set_timesteps(self, scheduler, steps: int, width: int, height: int) -> None:
        cfg = scheduler.config
        if cfg.get("use_dynamic_shifting"):
            _, _, h, w = self.latent_shape(width, height)
            seq_len = (h // self.patch_size) * (w // self.patch_size)
            mu = schedulers.calculate_shift(
                seq_len,
                cfg.get("base_image_seq_len", 256),
                cfg.get("max_image_seq_len", 4096),
                cfg.get("base_shift", 0.5),
                cfg.get("max_shift", 1.16),
            )
            scheduler.set_timesteps(steps, mu=mu)
        else:
            scheduler.set_timesteps(steps)

    def denoise(self, latents: np.ndarray, t, cond: dict, guidance: float) -> np.ndarray:
        batch = cond["embeds"].shape[0]
        sample = np.concatenate([latents] * batch) if batch > 1 else latents
        out = self.transformer(
            outputs=["out_hidden_states"],
            hidden_states=sample,
            timestep=np.full((batch,), t, dtype=np.float32),
            encoder_hidden_states=cond["embeds"],
            pooled_projections=cond["pooled"],
        )["out_hidden_states"]
        return classifier_free_guidance(out, guidance) if batch > 1 else out
