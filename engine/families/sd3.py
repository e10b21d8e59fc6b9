"""SD 3 / 3.5: an MMDiT conditioned on CLIP-L + CLIP-G (penultimate states, pooled) and T5, with CFG.

As StableDiffusion3Pipeline builds it: the CLIP states are concatenated on the feature axis, zero-padded to
T5's width and stacked before T5's tokens on the sequence axis. Without T5 (to save memory) its place is
zeros of the T5 window's length (max_sequence_length), as diffusers 0.39 does when text_encoder_3 is None.
"""

from __future__ import annotations

import numpy as np

import schedulers

from ..text_encoders import TextEncoder
from .base import Architecture, classifier_free_guidance, encode_text


class SD3Architecture(Architecture):
    components = {"text_encoder": True, "text_encoder_2": True, "text_encoder_3": False, "transformer": True}
    denoiser_component = "transformer"
    t5_component = "text_encoder_3"

    def __init__(self, manifest):
        super().__init__(manifest)
        self.joint_dim = int(self.config["joint_attention_dim"])
        self.t5_length = int(self.config["max_sequence_length"])
        self.patch_size = int(self.config.get("patch_size") or 2)

    def _encode_one(self, clips, t5, text: str, warnings) -> tuple[np.ndarray, np.ndarray]:
        outs = encode_text(clips, text, warnings)
        clip = np.concatenate([o.penultimate for o in outs], axis=-1)
        if t5 is not None:
            t5_states = encode_text([t5], text, warnings)[0].last_hidden
        else:
            t5_states = np.zeros((1, self.t5_length, self.joint_dim), dtype=np.float32)
        clip = np.pad(clip, ((0, 0), (0, 0), (0, t5_states.shape[-1] - clip.shape[-1])))
        return np.concatenate([clip, t5_states], axis=1), np.concatenate([o.pooled for o in outs], axis=-1)

    def encode(self, graphs, tokenizers, prompt, negative, guidance):
        pairs = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
        clips = [TextEncoder(graphs[n], tokenizers[t]) for n, t in pairs]
        t5 = TextEncoder(graphs["text_encoder_3"], tokenizers["tokenizer_3"]) if "text_encoder_3" in graphs else None
        warnings: list[str] = []
        embeds, pooled = self._encode_one(clips, t5, prompt, warnings)
        if self.uses_cfg(guidance):
            neg, neg_pooled = self._encode_one(clips, t5, negative, warnings)
            embeds, pooled = np.concatenate([neg, embeds]), np.concatenate([neg_pooled, pooled])
        return {"embeds": embeds, "pooled": pooled}, warnings

    def set_timesteps(self, scheduler, steps, width, height) -> None:
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

    def denoiser(self, graph, cond, extra, guidance):
        batch = cond["embeds"].shape[0]

        def denoise(x, t):
            sample = np.concatenate([x] * batch) if batch > 1 else x
            out = graph(
                outputs=["out_hidden_states"],
                hidden_states=sample,
                timestep=self.timestep(t, batch),
                encoder_hidden_states=cond["embeds"],
                pooled_projections=cond["pooled"],
            )["out_hidden_states"]
            return classifier_free_guidance(out, guidance) if batch > 1 else out

        return denoise
