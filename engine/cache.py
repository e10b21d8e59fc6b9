"""Step caching in numpy, composed around the denoiser's graphs: the whole one, or the graphs
``stepwise export --cache-graphs`` writes (its split; TaylorSeer's record and predict graphs).

A cached denoiser stands in for the whole transformer graph: called like it (``graph(outputs, **feeds)``),
it runs the graphs and decides, each call, what runs. The loop (engine/sampling.py) does not know: what it
sees is a graph. One object per generation: it holds that generation's state (residuals, Taylor factors), so
the pipeline itself stays free of per-request state. Steps are counted in denoiser calls, as the reference
hooks count them. Which steps compute is registry/cache.py's (the plan counts them with the same code),
except fbcache's, decided here from the data.

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

from registry.cache import (
    DEEPCACHE_GRAPHS,
    MODES,
    SPLIT_GRAPHS,
    TAYLOR_GRAPHS,
    CacheSpec,
    blocks_feeds,
    lacks_mag_ratios,
    out_feeds,
    taylor_coefficient,
)

from .errors import EngineError

FIRST, BLOCKS, OUT = SPLIT_GRAPHS
RECORD, PREDICT = TAYLOR_GRAPHS
COMPUTED, CACHED, PREDICTED = "computed", "cached", "predicted"


def _remaining_blocks(blocks, first: dict, feeds: dict) -> np.ndarray:
    """The blocks after the first, on what the first graph returned: their output hidden states."""
    return blocks(outputs=["out_hidden_states"], **blocks_feeds(first, first["first_block_hidden_states"], feeds))[
        "out_hidden_states"
    ]


def _output_layers(out, hidden: np.ndarray, first: dict, feeds: dict) -> dict[str, np.ndarray]:
    """The output layers on the blocks' hidden states: the transformer's output."""
    return out(outputs=["out_hidden_states"], **out_feeds(first, hidden, feeds))


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
            blocks = _remaining_blocks(self.blocks, first, feeds)
            self.blocks_residual = blocks - hidden
            self.first_residual = residual
            self.steps.append(COMPUTED)
        else:
            blocks = self.blocks_residual + hidden
            self.steps.append(CACHED)
        return _output_layers(self.out, blocks, first, feeds)


class _Scheduled:
    """A mode whose computed steps are fixed in advance (registry/cache.py's schedule of the resolved spec)."""

    def __init__(self, spec: CacheSpec, steps: int):
        # room for a second-order sampler's two calls a step; past the end every call computes
        self.decisions = spec.schedule(4 * steps + 4)
        self.steps: list[str] = []

    def _compute(self) -> bool:
        index = len(self.steps)
        return self.decisions[index] if index < len(self.decisions) else True


class MagCache(_Scheduled):
    """diffusers 0.39's MagCache (hooks/mag_cache.py): a skipped call runs no block; the hidden states entering
    the first block plus the residual the blocks added at the last computed call (the tail block's output
    minus the head block's input) go to the output layers. The first graph still runs the first block on a
    skipped call (its input is that graph's output): one block of waste, no change in the numbers."""

    def __init__(self, graphs: dict, spec: CacheSpec, steps: int):
        super().__init__(spec, steps)
        self.first, self.blocks, self.out = graphs[FIRST], graphs[BLOCKS], graphs[OUT]
        self.residual: np.ndarray | None = None
        self.calibrate = bool(spec.options["calibrate"])
        self.total = int(spec.options["num_inference_steps"] or steps)  # the hook resets after this many calls
        self.ratios: list[float] = []  # calibrate: the measured magnitude ratio of each call

    def _measure(self, residual: np.ndarray) -> None:
        """MagCacheBlockHook._perform_calibration_step: the mean over tokens of the ratio of this call's
        residual norm to the last call's (1.0 for the first call of a run)."""
        previous = self.residual if len(self.steps) % self.total else None
        if previous is None:
            self.ratios.append(1.0)
            return
        current = np.linalg.norm(residual.astype(np.float32), axis=-1)
        before = np.linalg.norm(previous.astype(np.float32), axis=-1)
        self.ratios.append(float((current / (before + np.float32(1e-8))).mean(dtype=np.float32)))

    def report(self) -> dict[str, str]:
        """What the run measured, for the image's parameters: the calibrated ratios, as mag_ratios=[...] takes them."""
        if not self.calibrate:
            return {}
        return {"cache_mag_ratios": "[" + ",".join(f"{r:.5f}" for r in self.ratios[: self.total]) + "]"}

    def __call__(self, outputs=None, **feeds) -> dict[str, np.ndarray]:
        compute = self._compute()
        first = self.first(**feeds)
        entering = first["first_block_input"]
        if compute:
            hidden = _remaining_blocks(self.blocks, first, feeds)
            residual = hidden - entering
            if self.calibrate:
                self._measure(residual)
            self.residual = residual
            self.steps.append(COMPUTED)
        else:
            hidden = entering + self.residual
            self.steps.append(CACHED)
        return _output_layers(self.out, hidden, first, feeds)


class TaylorFactors:
    """One module output's Taylor factors, as diffusers' TaylorSeerState keeps them (float32 here): a computed
    call's output replaces the factors with it and its divided differences against the last ones, up to
    ``max_order``; a predicted call sums ``factor × offset**order / order!`` over the orders it has."""

    def __init__(self, max_order: int):
        self.max_order = max_order
        self.factors: dict[int, np.ndarray] = {}
        self.last_update: int | None = None

    def update(self, output: np.ndarray, step: int) -> None:
        factors = {0: np.asarray(output, dtype=np.float32)}
        if self.last_update is not None:
            delta = np.float32(step - self.last_update)
            for order in range(self.max_order):
                previous = self.factors.get(order)
                if previous is None:
                    break
                factors[order + 1] = (factors[order] - previous) / delta
        self.factors, self.last_update = factors, step

    def predict(self, step: int) -> np.ndarray:
        offset = step - self.last_update
        output = np.zeros_like(self.factors[0])
        for order in range(len(self.factors)):
            output = output + self.factors[order] * np.float32(taylor_coefficient(offset, order))
        return output


class TaylorSeerLite(_Scheduled):
    """diffusers 0.39's TaylorSeer in lite mode (hooks/taylorseer_cache.py, use_lite_mode=True): on a predicted
    call every block is skipped and ``proj_out`` — whose output is FLUX's transformer output, and SD 3's before
    the unpatchify, a permutation that commutes with the prediction's elementwise arithmetic — returns its
    Taylor prediction from the factors of the computed calls (divided differences up to ``max_order``), so the
    whole graph runs on computed calls only. Factors stay float32 (the reference's default is bf16; the parity
    test runs it with float32 factors)."""

    def __init__(self, graph, spec: CacheSpec, steps: int):
        super().__init__(spec, steps)
        self.graph = graph
        self.output = TaylorFactors(int(spec.options["max_order"]))

    def __call__(self, outputs=None, **feeds) -> dict[str, np.ndarray]:
        step = len(self.steps)
        if self._compute():
            output = self.graph(outputs=["out_hidden_states"], **feeds)["out_hidden_states"]
            self.output.update(output, step)
            self.steps.append(COMPUTED)
        else:
            output = self.output.predict(step)
            self.steps.append(PREDICTED)
        return {"out_hidden_states": output}


class TaylorSeer(_Scheduled):
    """diffusers 0.39's TaylorSeer in its default mode: every block's attention module (the hook's
    ``^transformer_blocks.*attn`` and ``^single_transformer_blocks.*attn``) keeps Taylor factors of its outputs.
    A computed call runs the record graph — the whole transformer, returning those outputs too — and updates
    every module's factors; a predicted call runs the predict graph — the transformer with each attention
    module's output given — on their predictions, so everything but attention runs every call. Each hook
    counts its own calls, all alike: one schedule. Factors stay float32 (see ``TaylorSeerLite``)."""

    def __init__(self, graphs: dict, spec: CacheSpec, steps: int):
        super().__init__(spec, steps)
        self.record_graph, self.predict_graph = graphs[RECORD], graphs[PREDICT]
        self.names = [name for name in self.record_graph.outputs if name != "out_hidden_states"]
        order = int(spec.options["max_order"])
        self.factors = {name: TaylorFactors(order) for name in self.names}

    def __call__(self, outputs=None, **feeds) -> dict[str, np.ndarray]:
        step = len(self.steps)
        if self._compute():
            recorded = self.record_graph(outputs=["out_hidden_states", *self.names], **feeds)
            for name in self.names:
                self.factors[name].update(recorded[name], step)
            output = recorded["out_hidden_states"]
            self.steps.append(COMPUTED)
        else:
            predicted = {name: factors.predict(step) for name, factors in self.factors.items()}
            output = self.predict_graph(outputs=["out_hidden_states"], **feeds, **predicted)["out_hidden_states"]
            self.steps.append(PREDICTED)
        return {"out_hidden_states": output}


class DeepCache:
    """The deepcache package's DeepCacheSDHelper (skip_mode uniform, cache_branch_id 0): a call whose timestep's
    index in the schedule is ``cache_interval`` apart from the first call's runs the deep part and stores what
    enters the last up block's last layer; every call runs the shallow branch on the stored features. The
    index is the first position of the timestep in the schedule (``list(timesteps).index(t)``), as the helper
    looks it up: a repeated timestep (PNDM's second) repeats its index."""

    def __init__(self, graphs: dict, spec: CacheSpec, timesteps):
        self.deep, self.shallow = (graphs[name] for name in DEEPCACHE_GRAPHS)
        self.interval = int(spec.options["cache_interval"])
        self.timesteps = [float(np.float32(t)) for t in timesteps]
        self.first: int | None = None
        self.features: np.ndarray | None = None
        self.steps: list[str] = []

    def __call__(self, outputs=None, **feeds) -> dict[str, np.ndarray]:
        index = self.timesteps.index(float(np.asarray(feeds["timestep"], dtype=np.float32).reshape(-1)[0]))
        self.first = index if self.first is None else self.first
        if (index - self.first) % self.interval == 0:
            self.features = self.deep(outputs=["deep_features"], **feeds)["deep_features"]
            self.steps.append(COMPUTED)
        else:
            self.steps.append(CACHED)
        return self.shallow(outputs=["out_sample"], **feeds, deep_features=self.features)


class PerContext:
    """One cache per cache context, as diffusers' hooks keep one state per ``cache_context`` the pipeline sets
    (hooks/hooks.py StateManager): a denoiser that calls the transformer once per context each step, in a
    fixed order (Qwen-Image's true CFG: the prompt in "cond", then the negative in "uncond"), has each call
    served by its context's own cache, which counts its own calls. ``steps``: one verdict per step, the
    contexts' when they agree, else each context's joined by "/" in call order (``computed/cached``)."""

    def __init__(self, make, contexts: tuple[str, ...]):
        self.contexts = tuple(contexts)
        self.caches = [make() for _ in self.contexts]
        self.calls = 0
        self.steps: list[str] = []

    def __call__(self, outputs=None, **feeds) -> dict[str, np.ndarray]:
        out = self.caches[self.calls % len(self.caches)](outputs, **feeds)
        self.calls += 1
        if self.calls % len(self.caches) == 0:  # every context has run this step
            verdicts = [cache.steps[-1] for cache in self.caches]
            self.steps.append(verdicts[0] if len(set(verdicts)) == 1 else "/".join(verdicts))
        return out

    def report(self) -> dict[str, str]:
        """The first context's (the prompt's) report: a MagCache calibration measures the ratios there."""
        return getattr(self.caches[0], "report", dict)()


GRAPHS = {"split": SPLIT_GRAPHS, "taylor": TAYLOR_GRAPHS, "deepcache": DEEPCACHE_GRAPHS, "whole": ()}


def graphs_needed(spec: CacheSpec | None) -> tuple[str, ...]:
    """The graphs a generation with ``spec`` runs in place of the whole denoiser (none: the whole one)."""
    return GRAPHS[MODES[spec.mode].given(spec.options).graphs] if spec is not None else ()


def cached_denoiser(
    spec: CacheSpec,
    graphs: dict,
    model: str,
    timesteps,
    whole: str = "transformer",
    family: str | None = None,
    contexts: tuple[str, ...] = ("cond",),
):
    """The stand-in for the denoiser graph that ``spec`` runs over ``timesteps`` (the ones this run steps
    through, from the scheduler's full list for deepcache's lookup), fresh for one generation. ``family``:
    the model's, for MagCache's default ratios. ``contexts``: the denoiser's calls each step (the
    architecture's cache_contexts): more than one, and each gets a cache of its own (PerContext)."""
    if len(contexts) > 1:
        return PerContext(
            lambda: cached_denoiser(spec, graphs, model, timesteps, whole, family, contexts[:1]), contexts
        )
    missing = [name for name in graphs_needed(spec) if name not in graphs]
    if missing and spec.mode == "taylorseer":
        raise EngineError(
            f"--cache taylorseer predicts every attention module's output inside the transformer, which needs the "
            f"graphs {model} was exported without; export it again with --cache-graphs, or use "
            f"taylorseer:use_lite_mode=true (the transformer's output predicted, the whole graph)"
        )
    if missing:
        raise EngineError(
            f"--cache {spec.mode} runs the denoiser split in parts, which {model} was exported without; "
            f"export it again with --cache-graphs"
        )
    if spec.mode == "deepcache":
        return DeepCache(graphs, spec, timesteps)
    steps = len(timesteps)
    spec = spec.resolved(steps, family)
    if spec.mode == "fbcache":
        return FirstBlockCache(graphs, spec.options["threshold"])
    if spec.mode == "magcache":
        # registry.cache.check refuses this before a run; a direct generate() call reaches here
        if lacks_mag_ratios(spec, family):
            raise EngineError(
                f"--cache magcache on {model} needs mag_ratios=[...] (or mag_ratios=flux, or calibrate=true): "
                f"no magnitude ratios are published for {family}"
            )
        return MagCache(graphs, spec, steps)
    if spec.mode == "taylorseer" and spec.options["use_lite_mode"]:
        return TaylorSeerLite(graphs[whole], spec, steps)
    if spec.mode == "taylorseer":
        return TaylorSeer(graphs, spec, steps)
    raise EngineError(f"--cache {spec.mode} has no engine")
