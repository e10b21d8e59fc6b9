"""Our engine exactly as ``stepwise generate`` runs it: ``engine.load_pipeline`` and its family's encode,
prepare and denoise (SD 1.5 / SDXL UNets, SD3 and FLUX transformers alike)."""

from __future__ import annotations

import numpy as np

from .base import Engine


class _Recording:
    """An onnxruntime session that notes the input shapes of its runs (the FLOP count uses them)."""

    def __init__(self, session, shapes: dict):
        self._session, self._shapes = session, shapes

    def run(self, names, feeds, *args, **kwargs):
        self._shapes.update({k: list(np.shape(v)) for k, v in feeds.items()})
        return self._session.run(names, feeds, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._session, name)


class StepwiseEngine(Engine):
    def __init__(self, folder: str, threads: int, width: int, height: int, **_):
        import engine

        self.pipeline = self._load(engine, folder, threads)
        self.family = self.pipeline.family
        self.width, self.height = width, height
        self.prepared = False
        self.recorded: dict[str, dict] = {}
        for name, graph in self.family.graphs.items():
            if hasattr(graph, "session"):
                self.recorded[name] = {"path": str(graph.path), "shapes": {}}
                graph.session = _Recording(graph.session, self.recorded[name]["shapes"])

    def _load(self, engine, folder, threads):
        return engine.load_pipeline(folder, threads=threads)

    def encode(self, prompt, negative, guidance):
        cond = self.family.encode(prompt, negative, guidance)
        return {"embeds": cond["embeds"], "pooled": cond.get("pooled")}

    def step(self, latents, t, cond, guidance):
        cond = dict(cond)
        if not self.prepared:  # the same conditioning every step: per-generation inputs once
            self.family.prepare(cond, self.width, self.height, guidance)
            self.prepared = True
        return self.family.denoise(latents, t, cond, guidance)

    def decode(self, latents):
        return self.pipeline.vae(np.asarray(latents, dtype=np.float32))

    def graph_shapes(self) -> dict:
        """{component: {"path", "shapes": {input: shape}}} of the runs so far."""
        return self.recorded
