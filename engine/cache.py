"""Step caching in numpy, composed around the denoiser's split graphs (``stepwise export --cache-graphs``).

A cached denoiser stands in for the whole transformer graph: called like it (``graph(outputs, **feeds)``),
it runs the split graphs and decides, each call, whether the expensive part runs. The loop
(engine/sampling.py) does not know: what it sees is a graph. One object per generation: it holds that
generation's state (the residuals), so the pipeline itself stays free of per-request state.

``FirstBlockCache`` is diffusers 0.39's First Block Cache (hooks/first_block_cache.py) step for step:
- the first block always runs; its residual is its output hidden states minus its input;
- the rest runs when there is no earlier residual, or when ``mean|r - r_prev| / mean|r_prev|`` exceeds
  ``threshold``, where ``r_prev`` is the residual of the last step that ran the rest (the hook keeps the
  residual of computed steps only);
- a step that runs the rest stores the residual it added (the last block's hidden states minus the first
  block's, ``FBCBlockHook`` on the tail block); a step that does not adds the stored residual to the first
  block's output instead;
- the output layers run every step.
"""

from __future__ import annotations

import numpy as np

from registry.cache import SPLIT_GRAPHS, CacheSpec

from .errors import EngineError

FIRST, BLOCKS, OUT = SPLIT_GRAPHS
COMPUTED, CACHED = "computed", "cached"


class FirstBlockCache:
    def __init__(self, graphs: dict, threshold: float):
        self.first, self.blocks, self.out = graphs[FIRST], graphs[BLOCKS], graphs[OUT]
        self.threshold = float(threshold)
        self.first_residual: np.ndarray | None = None  # of the last computed step
        self.blocks_residual: np.ndarray | None = None  # what the remaining blocks added then
        self.steps: list[str] = []  # COMPUTED or CACHED, one per call
        self.changes: list[float | None] = []  # the relative change each decision compared (None: the first)

    def _compute(self, residual: np.ndarray) -> bool:
        previous = self.first_residual
        if previous is None:
            self.changes.append(None)
            return True
        change = np.abs(residual - previous).mean(dtype=np.float32) / np.abs(previous).mean(dtype=np.float32)
        self.changes.append(float(change))
        return float(change) > self.threshold

    def __call__(self, outputs=None, **feeds) -> dict[str, np.ndarray]:
        first = self.first(**feeds)
        hidden = first["first_block_hidden_states"]
        residual = hidden - first["first_block_input"]
        if self._compute(residual):
            blocks = self.blocks(
                outputs=["out_hidden_states"],
                hidden_states=hidden,
                encoder_hidden_states=first["first_block_encoder_hidden_states"],
                temb=first["temb"],
                rotary_cos=first["rotary_cos"],
                rotary_sin=first["rotary_sin"],
            )["out_hidden_states"]
            self.blocks_residual = blocks - hidden
            self.first_residual = residual
            self.steps.append(COMPUTED)
        else:
            blocks = self.blocks_residual + hidden
            self.steps.append(CACHED)
        return self.out(outputs=["out_hidden_states"], hidden_states=blocks, temb=first["temb"])


def graphs_needed(spec: CacheSpec | None) -> tuple[str, ...]:
    """The graphs a generation with ``spec`` runs in place of the whole denoiser (none without a cache)."""
    return SPLIT_GRAPHS if spec is not None else ()


def cached_denoiser(spec: CacheSpec, graphs: dict, model: str):
    """The stand-in for the denoiser graph that ``spec`` runs, fresh for one generation."""
    missing = [name for name in graphs_needed(spec) if name not in graphs]
    if missing:
        raise EngineError(
            f"--cache {spec.mode} runs the transformer split in parts, which {model} was exported without; "
            f"export it again with --cache-graphs"
        )
    if spec.mode == "fbcache":
        return FirstBlockCache(graphs, spec.options["threshold"])
    raise EngineError(f"--cache {spec.mode} has no engine")
