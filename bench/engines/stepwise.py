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
    """The pipeline loaded resident (every session kept, as a benchmark of steps wants); its sessions are
    made by ``graph_factory`` (the engine's own ``Graph``, or another runtime's in a subclass)."""

    def __init__(self, folder: str, threads: int, width: int, height: int, **_):
        import engine

        self.pipeline = engine.load_pipeline(
            folder, threads=threads, policy=engine.RESIDENT, graph_factory=self.graph_factory()
        )
        self.arch = self.pipeline.architecture
        self.width, self.height = width, height
        self.recorded: dict[str, dict] = {}
        with self.pipeline.sessions.phase(list(self.pipeline.sessions.paths)) as graphs:
            self.graphs = graphs
        for name, graph in self.graphs.items():
            if hasattr(graph, "session"):
                self.recorded[name] = {"path": str(graph.path), "shapes": {}}
                graph.session = _Recording(graph.session, self.recorded[name]["shapes"])

    def graph_factory(self):
        from engine.session import Graph

        return Graph

    def encode(self, prompt, negative, guidance):
        cond, _ = self.arch.encode(self.graphs, self.pipeline.tokenizers, prompt, negative, guidance)
        return {"embeds": cond["embeds"], "pooled": cond.get("pooled")}

    def step(self, latents, t, cond, guidance):
        # the conditioning arrives anew each step (pickled): its per-generation inputs cost microseconds
        extra = self.arch.prepare(cond, self.width, self.height, guidance)
        den = self.arch.denoiser(self.graphs[self.arch.denoiser_component], cond, extra, guidance)
        return den(latents, t)

    def decode(self, latents):
        return self.pipeline.vae.decode(self.graphs["vae_decoder"], np.asarray(latents, dtype=np.float32))

    def graph_shapes(self) -> dict:
        """{component: {"path", "shapes": {input: shape}}} of the runs so far."""
        return self.recorded
