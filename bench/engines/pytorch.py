"""diffusers/PyTorch eager on the same random weights: the family's pipeline class (StableDiffusionPipeline,
StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline) loaded from the saved source, its
``encode_prompt`` and its denoiser called the way the pipeline's ``__call__`` calls it: SDXL's time ids and
pooled ``text_embeds``, SD3's per-sample timesteps and pooled projections, FLUX's packed latents with
image/text position ids and t / 1000, classifier-free guidance as a batch of two where the family uses it.
An implementation independent of ours: only the weights are shared."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..images import to_uint8
from .base import Engine


class TorchEngine(Engine):
    def __init__(self, source: str, threads: int, width: int = 512, height: int = 512, **_):
        import diffusers
        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        self.kind = json.loads((Path(source) / "model_index.json").read_text())["_class_name"]
        extra = {"safety_checker": None} if self.kind == "StableDiffusionPipeline" else {}
        cls = getattr(diffusers, self.kind)
        self.pipe = cls.from_pretrained(source, torch_dtype=torch.float32, **extra)
        self.pipe.set_progress_bar_config(disable=True)
        self.denoiser = getattr(self.pipe, "unet", None) or self.pipe.transformer
        self.width, self.height = width, height
        self.extra = None

    def _np(self, tensor):
        return None if tensor is None else tensor.float().numpy()

    def encode(self, prompt, negative, guidance):
        torch, pipe = self.torch, self.pipe
        cfg = guidance > 1.0
        with torch.inference_mode():
            if self.kind in ("StableDiffusionPipeline", "LatentConsistencyModelPipeline"):
                cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, cfg, negative_prompt=negative)
                return {"embeds": self._np(torch.cat([uncond, cond]) if cfg else cond), "pooled": None}
            if self.kind == "StableDiffusionXLPipeline":
                # None, not "": the pipeline then zeroes the negative (force_zeros_for_empty_prompt), as ours does
                pe, npe, pp, npp = pipe.encode_prompt(
                    prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=cfg,
                    negative_prompt=negative or None,
                )  # fmt: skip
            elif self.kind == "StableDiffusion3Pipeline":
                pe, npe, pp, npp = pipe.encode_prompt(
                    prompt, None, None, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=cfg,
                    negative_prompt=negative, max_sequence_length=256,
                )  # fmt: skip
            elif self.kind == "FluxPipeline":
                pe, pp, _ = pipe.encode_prompt(prompt, None, device="cpu", num_images_per_prompt=1)
                return {"embeds": self._np(pe), "pooled": self._np(pp)}
            else:
                raise ValueError(f"no PyTorch step for {self.kind}")
            if cfg:
                pe, pp = torch.cat([npe, pe]), torch.cat([npp, pp])
            return {"embeds": self._np(pe), "pooled": self._np(pp)}

    def _prepare(self, cond: dict, guidance: float) -> None:
        torch, batch = self.torch, cond["embeds"].shape[0]
        self.extra = {}
        if self.kind == "StableDiffusionXLPipeline":
            # _get_add_time_ids: original size + crop top-left + target size, (height, width) order
            time_ids = torch.tensor([[self.height, self.width, 0, 0, self.height, self.width]], dtype=torch.float32)
            self.extra["added_cond_kwargs"] = {
                "text_embeds": torch.from_numpy(cond["pooled"]),
                "time_ids": time_ids.repeat(batch, 1),
            }
        elif self.kind == "FluxPipeline":
            f = self.pipe.vae_scale_factor * 2
            h, w = 2 * (self.height // f), 2 * (self.width // f)
            self.extra["img_ids"] = self.pipe._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)
            self.extra["txt_ids"] = torch.zeros(cond["embeds"].shape[1], 3)
            self.extra["pooled_projections"] = torch.from_numpy(cond["pooled"])
            if self.denoiser.config.guidance_embeds:
                self.extra["guidance"] = torch.full((1,), guidance, dtype=torch.float32)
        elif self.kind == "StableDiffusion3Pipeline":
            self.extra["pooled_projections"] = torch.from_numpy(cond["pooled"])

    def step(self, latents, t, cond, guidance):
        torch = self.torch
        if self.extra is None:
            self._prepare(cond, guidance)
        embeds = torch.from_numpy(np.ascontiguousarray(cond["embeds"], np.float32))
        batch = embeds.shape[0]
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(np.concatenate([latents] * batch), np.float32))
            if self.kind == "FluxPipeline":
                timestep = torch.full((batch,), float(t), dtype=torch.float32) / 1000
                out = self.denoiser(
                    hidden_states=x, timestep=timestep, encoder_hidden_states=embeds, return_dict=False, **self.extra
                )[0]
            elif self.kind == "StableDiffusion3Pipeline":
                timestep = torch.full((batch,), float(t), dtype=torch.float32)
                out = self.denoiser(
                    hidden_states=x, timestep=timestep, encoder_hidden_states=embeds, return_dict=False, **self.extra
                )[0]
            else:
                out = self.denoiser(x, torch.tensor(float(t)), embeds, return_dict=False, **self.extra)[0]
            if batch == 2:
                uncond, cond_out = out.chunk(2)
                out = uncond + guidance * (cond_out - uncond)
            return out.numpy()

    def decode(self, latents):
        torch, vae = self.torch, self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        with torch.inference_mode():
            z = torch.from_numpy(np.asarray(latents, np.float32) / vae.config.scaling_factor + shift)
            return to_uint8(vae.decode(z.float(), return_dict=False)[0].numpy())
