"""Our engine exactly as ``stepwise generate`` runs it: ``engine.load_pipeline`` and its family's denoise."""

from __future__ import annotations

import numpy as np

from .base import Engine


class StepwiseEngine(Engine):
    def __init__(self, folder: str, threads: int, width: int, height: int):
        import engine

        self.pipeline = engine.load_pipeline(folder, threads=threads)
        self.width, self.height = width, height
        self.prepared = False

    def encode(self, prompt, negative):
        return self.pipeline.family.encode(prompt, negative, 7.5)["embeds"]

    def step(self, latents, t, embeds, guidance):
        cond = {"embeds": embeds, "pooled": None}
        if not self.prepared:
            self.pipeline.family.prepare(cond, self.width, self.height, guidance)
            self.prepared = True
        return self.pipeline.family.denoise(latents, t, cond, guidance)

    def decode(self, latents):
        return self.pipeline.vae(np.asarray(latents, dtype=np.float32))
