"""FLUX.1 schnell / dev: a rectified-flow transformer over packed 2x2 latent patches with positional ids.

As FluxPipeline does it: pooled CLIP-L, T5 states (the manifest's window: 256 tokens for schnell, 512 for
dev), timesteps scaled as the manifest records (/1000), dev's distilled guidance as an input (no CFG),
explicit sigmas linspace(1, 1/N) shifted by a `mu` that grows with the image's sequence length.
"""

from __future__ import annotations

import numpy as np

import schedulers

from ..text_encoders import TextEncoder
from .base import Architecture, encode_text


class FluxArchitecture(Architecture):
    components = {"text_encoder": True, "text_encoder_2": True, "transformer": True}
    denoiser_component = "transformer"
    t5_component = "text_encoder_2"

    def __init__(self, manifest):
        super().__init__(manifest)
        self.guidance_embeds = bool(self.config.get("guidance_embeds", False))

    def uses_cfg(self, guidance: float) -> bool:
        return False  # schnell has no guidance; dev's is an input of the transformer

    def encode(self, graphs, tokenizers, prompt, negative, guidance):
        warnings: list[str] = []
        clip = TextEncoder(graphs["text_encoder"], tokenizers["tokenizer"])
        t5 = TextEncoder(graphs["text_encoder_2"], tokenizers["tokenizer_2"])
        clip_out, t5_out = encode_text([clip, t5], prompt, warnings)
        return {"embeds": t5_out.last_hidden, "pooled": clip_out.pooled}, warnings

    @property
    def image_scale_factor(self) -> int:
        return self.vae_scale_factor * 2

    def latent_shape(self, width, height):
        f = self.image_scale_factor  # latents must split into 2x2 patches
        return (1, self.latent_channels, 2 * (height // f), 2 * (width // f))

    def pack(self, latents):
        b, c, h, w = latents.shape
        x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
        return np.ascontiguousarray(x.reshape(b, (h // 2) * (w // 2), c * 4))

    def pack_mask(self, mask):
        # FluxInpaintPipeline repeats the mask over the latent channels and packs it like the latents
        return self.pack(np.repeat(mask, self.latent_channels, axis=1))

    def unpack(self, latents, width, height):
        _, c, h, w = self.latent_shape(width, height)
        b = latents.shape[0]
        x = latents.reshape(b, h // 2, w // 2, c, 2, 2).transpose(0, 3, 1, 4, 2, 5)
        return np.ascontiguousarray(x.reshape(b, c, h, w))

    def set_timesteps(self, scheduler, steps, width, height) -> None:
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

    def prepare(self, cond, width, height, guidance) -> dict:
        _, _, h, w = self.latent_shape(width, height)
        ids = np.zeros((h // 2, w // 2, 3), dtype=np.float32)
        ids[..., 1] = np.arange(h // 2)[:, None]
        ids[..., 2] = np.arange(w // 2)[None, :]
        extra = {
            "img_ids": ids.reshape(-1, 3),
            "txt_ids": np.zeros((cond["embeds"].shape[1], 3), dtype=np.float32),
        }
        if self.guidance_embeds:
            extra["guidance"] = np.full((1,), guidance, dtype=np.float32)
        return extra

    def denoiser(self, graph, cond, extra, guidance):
        def denoise(x, t):
            return graph(
                outputs=["out_hidden_states"],
                hidden_states=x,
                timestep=self.timestep(t, x.shape[0]),
                encoder_hidden_states=cond["embeds"],
                pooled_projections=cond["pooled"],
                **extra,
            )["out_hidden_states"]

        return denoise
