"""SD 1.5, SDXL (Turbo, Lightning) and LCM: a UNet conditioned on CLIP states.

SDXL adds a second CLIP (penultimate states concatenated, pooled projection as `text_embeds`) and size
`time_ids`; LCM replaces classifier-free guidance with a guidance embedding (`timestep_cond`); an inpainting
UNet (9 input channels) takes the mask and the masked image's latents beside the latents.
"""

from __future__ import annotations

import numpy as np

import schedulers

from ..text_encoders import TextEncoder
from .base import Architecture, classifier_free_guidance, encode_text

INPAINT_CHANNELS = 9  # 4 latent + 1 mask + 4 masked-image latents (stable-diffusion-inpainting)


class UNetArchitecture(Architecture):
    components = {"text_encoder": True, "text_encoder_2": False, "unet": True}
    denoiser_component = "unet"

    def __init__(self, manifest):
        super().__init__(manifest)
        self.xl = "text_encoder_2" in manifest.components
        self.time_cond_dim = self.config.get("time_cond_proj_dim")
        # SDXL pipelines zero the negative conditioning when no negative prompt is given
        self.zero_empty_negative = bool(self.config.get("force_zeros_for_empty_prompt", False))
        self.inpainting = int(self.config.get("in_channels") or 4) == INPAINT_CHANNELS

    def uses_cfg(self, guidance: float) -> bool:
        # LCM's UNet embeds the guidance scale instead; diffusers never runs CFG for it
        return guidance > 1.0 and self.time_cond_dim is None

    def _encode_one(self, encoders, text: str, warnings) -> tuple[np.ndarray, np.ndarray | None]:
        outs = encode_text(encoders, text, warnings)
        if not self.xl:
            return outs[0].last_hidden, None
        # the last encoder's projection is SDXL's pooled embedding
        return np.concatenate([o.penultimate for o in outs], axis=-1), outs[-1].pooled

    def encode(self, graphs, tokenizers, prompt, negative, guidance):
        names = [n for n in ("text_encoder", "text_encoder_2") if n in graphs]
        encoders = [TextEncoder(graphs[n], tokenizers[n.replace("text_encoder", "tokenizer")]) for n in names]
        warnings: list[str] = []
        embeds, pooled = self._encode_one(encoders, prompt, warnings)
        cond = {"embeds": embeds, "pooled": pooled}
        if self.uses_cfg(guidance):
            if self.xl and self.zero_empty_negative and not negative:
                neg, neg_pooled = np.zeros_like(embeds), np.zeros_like(pooled)
            else:
                neg, neg_pooled = self._encode_one(encoders, negative, warnings)
            cond["embeds"] = np.concatenate([neg, embeds])
            if self.xl:
                cond["pooled"] = np.concatenate([neg_pooled, pooled])
        return cond, warnings

    def prepare(self, cond, width, height, guidance) -> dict:
        batch = cond["embeds"].shape[0]
        extra = {}
        if self.xl:
            # (original size, crop top-left, target size), the pipeline's defaults for a plain generation
            time_ids = np.array([[height, width, 0, 0, height, width]], dtype=np.float32)
            extra["time_ids"] = np.repeat(time_ids, batch, axis=0)
            extra["text_embeds"] = cond["pooled"]
        if self.time_cond_dim is not None:
            w = np.array([guidance - 1.0], dtype=np.float32)  # LatentConsistencyModelPipeline embeds w = scale - 1
            extra["timestep_cond"] = schedulers.guidance_scale_embedding(w, int(self.time_cond_dim))
        return extra

    def denoiser(self, graph, cond, extra, guidance):
        cfg = cond["embeds"].shape[0] == 2
        masked = cond.get("inpaint")  # (mask, masked-image latents), batched like the text states

        def denoise(x, t):
            sample = np.concatenate([x, x]) if cfg else x
            if self.inpainting:
                sample = np.concatenate([sample, *masked], axis=1)
            out = graph(
                outputs=["out_sample"],
                sample=sample,
                timestep=self.timestep(t, sample.shape[0]),
                encoder_hidden_states=cond["embeds"],
                **extra,
            )["out_sample"]
            return classifier_free_guidance(out, guidance) if cfg else out

        return denoise
