"""diffusers/PyTorch eager on the same random weights: what a user of ``StableDiffusionPipeline`` on CPU gets."""

from __future__ import annotations

import numpy as np

from ..images import to_uint8
from .base import Engine


class TorchEngine(Engine):
    def __init__(self, source: str, threads: int):
        import torch
        from diffusers import StableDiffusionPipeline

        torch.set_num_threads(threads)
        self.torch = torch
        self.pipe = StableDiffusionPipeline.from_pretrained(source, safety_checker=None, torch_dtype=torch.float32)
        self.pipe.set_progress_bar_config(disable=True)

    def encode(self, prompt, negative):
        with self.torch.inference_mode():
            cond, uncond = self.pipe.encode_prompt(prompt, "cpu", 1, True, negative_prompt=negative)
            return self.torch.cat([uncond, cond]).numpy()

    def step(self, latents, t, embeds, guidance):
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(np.concatenate([latents, latents]).astype(np.float32))
            out = self.pipe.unet(x, torch.tensor(float(t)), torch.from_numpy(embeds), return_dict=False)[0]
            uncond, cond = out.chunk(2)
            return (uncond + guidance * (cond - uncond)).numpy()

    def decode(self, latents):
        torch = self.torch
        with torch.inference_mode():
            z = torch.from_numpy(np.asarray(latents, np.float32) / self.pipe.vae.config.scaling_factor)
            return to_uint8(self.pipe.vae.decode(z, return_dict=False)[0].numpy())
