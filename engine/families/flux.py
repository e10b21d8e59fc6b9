"""FLUX.1 schnell / dev: a rectified-flow transformer over packed 2x2 latent patches with positional ids.

As FluxPipeline does it: pooled CLIP-L, T5 states (256 tokens for schnell, 512 for dev), timesteps / 1000,
dev's distilled guidance as an input (no CFG), explicit sigmas linspace(1, 1/N) shifted by a `mu` that grows
with the image's sequence length.
"""

from __future__ import annotations

import numpy as np

import schedulers

from ..text_encoders import TextEncoder
from .base import Family


class FluxFamily(Family):
    components = {"text_encoder": True, "text_encoder_2": True, "transformer": True}
    denoiser_component = "transformer"

    def __init__(self, *args):
        super().__init__(*args)
        self.clip = TextEncoder(self.graphs["text_encoder"], self.tokenizers["tokenizer"])
        self.guidance_embeds = bool(self.config.get("guidance_embeds", False))
        self.t5 = TextEncoder(self.graphs["text_encoder_2"], self.tokenizers["tokenizer_2"])
        self.transformer = self.graphs["transformer"]

    @staticmethod
    def tokenizer_lengths(config: dict) -> dict[str, int]:
        # T5 window: 256 tokens for schnell, 512 for dev (the lengths their model cards use)
        return {
            "tokenizer_2": int(config.get("max_sequence_length") or (512 if config.get("guidance_embeds") else 256))
        }

    def uses_cfg(self, guidance: float) -> bool:
        return False  # schnell has no guidance; dev's is an input of the transformer

    def encode(self, prompt: str, negative: str, guidance: float) -> dict:
        clip = self.clip(prompt)
        t5 = self.t5(prompt)
        self._note_truncation(self.clip, clip.truncated)
        self._note_truncation(self.t5, t5.truncated)
        return {"embeds": t5.last_hidden, "pooled": clip.pooled}

    def latent_shape(self, width: int, height: int) -> tuple[int, ...]:
        f = self.vae_scale_factor * 2  # latents must split into 2x2 patches
        return (1, self.latent_channels, 2 * (height // f), 2 * (width // f))

    def pack(self, latents: np.ndarray) -> np.ndarray:
        b, c, h, w = latents.shape
        x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
        return np.ascontiguousarray(x.reshape(b, (h // 2) * (w // 2), c * 4))

    def unpack(self, latents: np.ndarray, width: int, height: int) -> np.ndarray:
        _, c, h, w = self.latent_shape(width, height)
        b = latents.shape[0]
        x = latents.reshape(b, h // 2, w // 2, c, 2, 2).transpose(0, 3, 1, 4, 2, 5)
        return np.ascontiguousarray(x.reshape(b, c, h, w))

    def set_timesteps(self, scheduler, steps: int, width: int, height: int) -> None:
        _, _, h, w = self.latent_shape(width, height)
        seq_len = (h // 2) * (w // 2)
        cfg = scheduler.config
        mu = schedulers.calculate_shift(
            seq_len,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        sigmas = None if cfg.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        scheduler.set_timesteps(steps, sigmas=sigmas, mu=mu)

    def prepare(self, cond: dict, width: int, height: int, guidance: float) -> None:
        _, _, h, w = self.latent_shape(width, height)
        ids = np.zeros((h // 2, w // 2, 3), dtype=np.float32)
        ids[..., 1] = np.arange(h // 2)[:, None]
        ids[..., 2] = np.arange(w // 2)[None, :]
        self.extra = {
            "img_ids": ids.reshape(-1, 3),
            "txt_ids": np.zeros((cond["embeds"].shape[1], 3), dtype=np.float32),
        }
        if self.guidance_embeds:
            self.extra["guidance"] = np.full((1,), guidance, dtype=np.float32)

    def denoise(self, latents: np.ndarray, t, cond: dict, guidance: float) -> np.ndarray:
        timestep = np.full((latents.shape[0],), np.float32(t) / 1000, dtype=np.float32)
        return self.transformer(
            outputs=["out_hidden_states"],
            hidden_states=latents,
            timestep=timestep,
            encoder_hidden_states=cond["embeds"],
            pooled_projections=cond["pooled"],
            **self.extra,
        )["out_hidden_states"]
