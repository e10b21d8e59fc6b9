"""SD 1.5, SDXL (Turbo, Lightning) and LCM: a UNet conditioned on CLIP states.

SDXL adds a second CLIP (penultimate states concatenated, pooled projection as `text_embeds`) and size
`time_ids`; LCM replaces classifier-free guidance with a guidance embedding (`timestep_cond`).
"""

from __future__ import annotations

import numpy as np

import schedulers

from ..text_encoders import TextEncoder
from .base import Family, classifier_free_guidance


class UNetFamily(Family):
    components = {"text_encoder": True, "text_encoder_2": False, "unet": True}
    denoiser_component = "unet"

    def __init__(self, *args):
        super().__init__(*args)
        self.encoders = [
            TextEncoder(self.graphs[name], self.tokenizers[tok])
            for name, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
            if name in self.graphs
        ]
        self.xl = len(self.encoders) == 2
        self.unet = self.graphs["unet"]
        self.time_cond_dim = self.config.get("time_cond_proj_dim")
        # SDXL pipelines zero the negative conditioning when no negative prompt is given
        self.zero_empty_negative = bool(self.model_index.get("force_zeros_for_empty_prompt", False))

    def uses_cfg(self, guidance: float) -> bool:
        # LCM's UNet embeds the guidance scale instead; diffusers never runs CFG for it
        return guidance > 1.0 and self.time_cond_dim is None

    def _encode_one(self, text: str) -> tuple[np.ndarray, np.ndarray | None]:
        if not self.xl:
            out = self.encoders[0](text)
            self._note_truncation(self.encoders[0], out.truncated)
            return out.last_hidden, None
        states, pooled = [], None
        for encoder in self.encoders:
            out = encoder(text)
            self._note_truncation(encoder, out.truncated)
            states.append(out.penultimate)
            pooled = out.pooled  # the last encoder's projection is SDXL's pooled embedding
        return np.concatenate(states, axis=-1), pooled

    def encode(self, prompt: str, negative: str, guidance: float) -> dict:
        embeds, pooled = self._encode_one(prompt)
        cond = {"embeds": embeds, "pooled": pooled}
        if self.uses_cfg(guidance):
            if self.xl and self.zero_empty_negative and not negative:
                neg, neg_pooled = np.zeros_like(embeds), np.zeros_like(pooled)
            else:
                neg, neg_pooled = self._encode_one(negative)
            cond["embeds"] = np.concatenate([neg, embeds])
            if self.xl:
                cond["pooled"] = np.concatenate([neg_pooled, pooled])
        return cond

    def prepare(self, cond: dict, width: int, height: int, guidance: float) -> None:
        batch = cond["embeds"].shape[0]
        self.extra = {}
        if self.xl:
            # (original size, crop top-left, target size), the pipeline's defaults for a plain generation
            time_ids = np.array([[height, width, 0, 0, height, width]], dtype=np.float32)
            self.extra["time_ids"] = np.repeat(time_ids, batch, axis=0)
            self.extra["text_embeds"] = cond["pooled"]
        if self.time_cond_dim is not None:
            w = np.array([guidance - 1.0], dtype=np.float32)  # LatentConsistencyModelPipeline embeds w = scale - 1
            self.extra["timestep_cond"] = schedulers.guidance_scale_embedding(w, int(self.time_cond_dim))

    def denoise(self, latents: np.ndarray, t, cond: dict, guidance: float) -> np.ndarray:
        cfg = cond["embeds"].shape[0] == 2
        sample = np.concatenate([latents, latents]) if cfg else latents
        out = self.unet(
            outputs=["out_sample"], sample=sample, timestep=t, encoder_hidden_states=cond["embeds"], **self.extra
        )["out_sample"]
        return classifier_free_guidance(out, guidance) if cfg else out
