"""A loaded export and its generations, in phases: encode the prompt → (encode the image) → denoise → decode.

The pipeline holds only what the export is (manifest, architecture, tokenizers, sessions under their load
policy); everything of one generation lives in ``generate``'s frame, so one pipeline serves several
generations at once from several threads (ONNX Runtime sessions are safe to ``run`` concurrently).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

import registry
import schedulers
from registry import cache as step_cache
from registry import manifest as manifest_format
from registry import policy
from registry.verify import verify

from . import cache as caching
from . import img2img, sampling
from .errors import EngineError
from .families import ARCHITECTURES, CASCADES
from .families.base import read_scheduler
from .loader import Sessions
from .memory import MemoryPlan, plan_memory
from .profile import Profiler, StepBar
from .session import Graph
from .tokenize import PromptTokenizer
from .vae import TiledDecoder, TiledEncoder, Tiling, Vae


@dataclass
class Result:
    image: np.ndarray  # (H, W, 3) uint8
    latents: np.ndarray  # the final latents that were decoded, unpacked (1, C, h, w)
    parameters: dict
    profile: dict
    warnings: list[str]


class Pipeline:
    def __init__(
        self,
        folder: Path,
        *,
        threads: int | None = None,
        skip: tuple[str, ...] = (),
        available_mb: float | None = None,
        policy: str | None = None,
        graph_factory=Graph,
        width: int | None = None,
        height: int | None = None,
        guidance: float | None = None,
        image: bool = False,
        vae_tiling: bool | None = None,
        cache: step_cache.CacheSpec | None = None,
    ):
        """``width``/``height``/``guidance``/``image``/``vae_tiling``/``cache``: the generation the memory plan is
        made for (default: the model's size, with guidance, no step cache); ``generate`` checks its own against
        the same budget. With ``cache`` the denoise phase is the split graphs that mode runs, not the whole; a
        generation with another cache choice creates the graphs it needs when it runs (kept after, if resident)."""
        self.folder = Path(folder)
        self.manifest = manifest_format.read(self.folder)
        verify(self.manifest)  # a corrupted graph of the right size is refused, not run
        family = self.manifest.family
        if family not in ARCHITECTURES:
            raise EngineError(f"{self.folder} holds a {family} model, which has no Stepwise engine yet")
        if family in CASCADES:
            raise EngineError(f"{self.folder} holds a {family} cascade; load it with engine.load_pipeline")
        arch = ARCHITECTURES[family](self.manifest)
        self.architecture = arch
        present = self.manifest.components
        required = [n for n, needed in arch.components.items() if needed] + ["vae_decoder"]
        missing = [n for n in required if n not in present]
        if missing:
            raise EngineError(
                f"{self.folder} lacks {', '.join(missing)}, which a {family} model needs; export the model again"
            )
        needed = [n for n in skip if arch.components.get(n)]
        if needed:  # --no-t5 leaves SD 3's optional T5 out; other families cannot run without theirs
            raise EngineError(f"a {family} model cannot run without its {needed[0]}; run without --no-t5")
        text = [n for n in arch.text_components if n in present and n not in skip]
        self.phases = {
            "encode": text,
            "image": ["vae_encoder"] if "vae_encoder" in present else [],
            "denoise": self._denoiser_graphs(cache),
            "decode": ["vae_decoder"],
        }
        self.memory = self._plan(width, height, guidance, image, vae_tiling, policy, available_mb)
        paths = {name: self.manifest.component_path(name) for names in self.phases.values() for name in names}
        others = (
            arch.denoiser_component,
            *step_cache.SPLIT_GRAPHS,
            *step_cache.TAYLOR_GRAPHS,
            *step_cache.DEEPCACHE_GRAPHS,
        )
        lazy = [n for n in others if n in present and n not in paths]
        paths.update({name: self.manifest.component_path(name) for name in lazy})
        self.sessions = Sessions(
            paths, threads=threads, policy=self.memory.policy, graph_factory=graph_factory, lazy=lazy
        )
        lengths = arch.tokenizer_lengths()
        self.tokenizers = {}
        for name in text:
            tok = name.replace("text_encoder", "tokenizer")
            self.tokenizers[tok] = PromptTokenizer(self.folder / tok, lengths.get(tok), pad=arch.pad_prompts)
        self.vae = Vae(self.manifest.config, Tiling.of(self.manifest))
        self.scheduler_config = _scheduler_config(self.folder)

    def _denoiser_graphs(self, cache) -> list[str]:
        """The denoise phase's graphs for a generation with ``cache``: the whole denoiser, or its split."""
        return list(caching.graphs_needed(cache)) or [self.architecture.denoiser_component]

    @property
    def family(self):
        """The architecture (latent layout, conditioning) — what callers knew as the pipeline's family."""
        return self.architecture

    @property
    def load_ms(self) -> float:
        return self.sessions.load_ms

    @property
    def model_label(self) -> str:
        return self.manifest.model_id or self.folder.name

    @property
    def has_image_encoder(self) -> bool:
        return bool(self.phases["image"])

    def _plan(self, width, height, guidance, image, vae_tiling, policy, available_mb) -> MemoryPlan:
        batch = self.architecture.denoiser_batch(guidance)
        if width is not None and height is not None:
            width, height = self.architecture.image_size(width, height)
        return plan_memory(
            self.manifest,
            self.phases,
            policy,
            available_mb,
            width=width,
            height=height,
            batch=batch,
            image=image,
            vae_tiling=vae_tiling,
            contexts=self.architecture.context_count(guidance),
        )

    def plan_memory(self, width, height, *, guidance=None, image=False, vae_tiling=None) -> MemoryPlan:
        """The memory plan of one generation under this pipeline's policy and the memory it was loaded with."""
        return self._plan(width, height, guidance, image, vae_tiling, self.memory.policy, self.memory.available_mb)

    def _vae_graph(self, graphs: dict, name: str, plan: MemoryPlan):
        """A VAE graph as this generation runs it: in tiles (diffusers' enable_tiling) when the plan says so."""
        if not plan.vae_tiling:
            return graphs[name]
        tiled = TiledDecoder if name == "vae_decoder" else TiledEncoder
        return tiled(graphs[name], self.vae.tiling)

    def make_scheduler(self, name: str | dict | None):
        """The export's scheduler, or another by diffusers class name; a dict gives config options too
        (``_class_name`` and e.g. ``use_karras_sigmas``: AUTOMATIC1111's "DPM++ 2M Karras")."""
        config = dict(self.scheduler_config)
        if isinstance(name, dict):
            config.update(name)
            name = name.get("_class_name") or config["_class_name"]
        elif name:
            config["_class_name"] = name
        try:
            sched = schedulers.from_config(config)
            native = schedulers.from_config(self.scheduler_config)
        except ValueError as exc:
            raise EngineError(f"--scheduler {name}: {exc}") from None
        if sched.flow != native.flow:  # a noise-prediction sampler on a flow model (or back) draws garbage
            kind = "flow-matching" if native.flow else "noise-prediction (diffusion)"
            raise EngineError(
                f"--scheduler {name} does not fit {self.model_label}, a {kind} model; "
                f"use its own {native.name} or another {kind} sampler (docs/schedulers.md)"
            )
        return sched

    def _noise(self, shape, latents: np.ndarray | None, rng) -> np.ndarray:
        if latents is None:
            return rng.standard_normal(shape, dtype=np.float32)
        latents = np.asarray(latents, dtype=np.float32)
        if not np.isfinite(latents).all():
            raise EngineError("--latents holds NaN or infinite values; save standard-normal noise")
        if latents.shape != shape:
            h, w = shape[2] * self.architecture.vae_scale_factor, shape[3] * self.architecture.vae_scale_factor
            raise EngineError(
                f"--latents has shape {latents.shape}, but {w}x{h} needs {shape}; "
                f"save standard-normal noise of that shape"
            )
        return latents

    def _finite_check(self):
        """A step whose latents hold NaN/Inf ends the run there, naming the step, never a black PNG."""
        denoiser = self.architecture.denoiser_component

        def check(step: sampling.Step) -> None:
            if not np.isfinite(step.latents).all():
                raise EngineError(
                    f"step {step.index + 1} of {step.total}: the {denoiser}'s output made the latents NaN or infinite "
                    f"(a broken export, or a guidance scale too large); export the model again or lower --guidance"
                )

        return check

    def _phase(self, name: str, prof: Profiler):
        return self.sessions.phase(self.phases[name], on_load=lambda ms: prof.add("phase_load", ms))

    def _encode(self, prompt, negative, guidance, prof):
        with self._phase("encode", prof) as graphs, prof.section("text_encoder"):
            return self.architecture.encode(graphs, self.tokenizers, prompt, negative, guidance)

    def generate(
        self,
        *,
        prompt: str,
        negative_prompt: str = "",
        steps: int,
        guidance: float,
        width: int | None = None,
        height: int | None = None,
        seed: int,
        latents: np.ndarray | None = None,
        scheduler: str | dict | None = None,
        image=None,
        mask=None,
        strength: float | None = None,
        callback=None,
        show_progress: bool = False,
        vae_tiling: bool | None = None,
        cache: step_cache.CacheSpec | None = None,
    ) -> Result:
        """One image. With ``image`` (a PIL image): image-to-image from ``strength`` of the schedule; with
        ``mask`` too (white is repainted): inpainting. ``callback(sampling.Step)`` sees every step and may
        stop the run by returning False. Every random tensor is drawn from ``default_rng(seed)`` in the
        order diffusers calls ``randn_tensor``. ``vae_tiling``: True decodes (and encodes) in tiles as
        diffusers' ``vae.enable_tiling()``, None when the memory plan needs it, False never. ``cache``: a step
        cache (registry.cache.parse; engine/cache.py runs it), None for every step in full."""
        arch = self.architecture
        prof = Profiler()
        prof.add("load", self.sessions.load_ms)
        start_image = img2img.StartImage.check(image, mask, strength, self, width, height)
        if start_image is not None:
            width, height = start_image.width, start_image.height
        if width is None or height is None:
            raise EngineError("say the image size: width and height")
        size_note = []
        if (arch.image_size(width, height)) != (width, height):
            asked = f"{width}x{height}"
            width, height = arch.image_size(width, height)
            size_note.append(f"{self.model_label} generates at one area: {asked} was rescaled to {width}x{height}")
        plan = self.plan_memory(
            width, height, guidance=guidance, image=start_image is not None, vae_tiling=vae_tiling
        )  # refuses, before anything runs, a size that does not fit
        sched = self.make_scheduler(scheduler)
        rng = np.random.default_rng(seed)
        bar = StepBar(steps, show_progress)

        ignored = []
        if negative_prompt and not arch.uses_cfg(guidance):  # not used: neither run nor written into the PNG
            ignored.append(f"--negative is ignored: {self.model_label} runs without classifier-free guidance here")
            negative_prompt = ""
        negative_prompt = arch.negative_prompt_used(negative_prompt, guidance)
        bar.phase("encoding the prompt")
        cond, warnings = self._encode(prompt, negative_prompt, guidance, prof)
        warnings = size_note + ignored + warnings
        if start_image is not None and sched.strength_in_schedule:  # LCM: strength shapes the schedule itself
            arch.set_timesteps(sched, steps, width, height, strength=start_image.strength)
        else:
            arch.set_timesteps(sched, steps, width, height)
        start, after_step = 0, None
        if start_image is None:
            if arch.config.get("in_channels") == 9:
                raise EngineError(
                    f"{self.model_label} is an inpainting model: give --image and --mask, or use a text-to-image model"
                )
            noise = self._noise(arch.latent_shape(width, height), latents, rng)
            x = arch.pack(noise * np.float32(sched.init_noise_sigma))
        else:
            rounding = "all" if sched.strength_in_schedule else registry.family(self.manifest.family).strength_steps
            run = policy.steps_run(steps, start_image.strength, rounding)
            if run < 1:
                raise EngineError(
                    f"--strength {start_image.strength:g} with {steps} steps runs no step; raise --strength or --steps"
                )
            start = sampling.schedule_start(sched, steps, run)
            bar.phase("encoding the image")
            with self._phase("image", prof) as graphs, prof.section("vae_encode"):
                x, cond, after_step = start_image.prepare(
                    self, self._vae_graph(graphs, "vae_encoder", plan), sched, start, cond, guidance, latents, rng
                )
        extra = arch.prepare(cond, width, height, guidance)

        bar.phase("loading the denoiser")
        watch = sampling.callbacks(self._finite_check(), prof.on_step, bar.on_step, callback)
        names = self._denoiser_graphs(cache)
        with self.sessions.phase(names, on_load=lambda ms: prof.add("phase_load", ms)) as graphs:
            bar.begin_steps(len(sched.timesteps) - start)
            if cache is None:
                graph = graphs[arch.denoiser_component]
            else:  # the graphs composed as the whole, deciding each step what runs (engine/cache.py)
                cache = cache.resolved(len(sched.timesteps) - start, self.manifest.family)
                timesteps = sched.timesteps if cache.mode == "deepcache" else sched.timesteps[start:]
                graph = caching.cached_denoiser(
                    cache,
                    graphs,
                    self.model_label,
                    timesteps,
                    arch.denoiser_component,
                    self.manifest.family,
                    contexts=arch.cache_contexts(cond),
                )
                prof.watch_cache(graph.steps)
            denoise = arch.denoiser(graph, cond, extra, guidance)
            sampled = sampling.sample(denoise, sched, x, start=start, rng=rng, callback=watch, after_step=after_step)
            measured = getattr(graph, "report", dict)()  # what a cache measured (MagCache's calibration)
            del denoise, graph  # hold the sessions: released with the phase
        final = arch.unpack(sampled.latents, width, height)
        bar.phase("decoding")
        with self._phase("decode", prof) as graphs, prof.section("vae_decode"):
            picture = self.vae.decode(self._vae_graph(graphs, "vae_decoder", plan), final)  # raises on NaN/Inf
        bar.clear()
        parameters = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "steps": steps,
            "guidance": guidance,
            "seed": seed,
            "width": width,
            "height": height,
            "model": self.model_label,
            "scheduler": sched.name,
            "sampler": _sampler_label(sched),
        }
        if start_image is not None:
            parameters["strength"] = start_image.strength
            parameters["steps_run"] = sampled.steps_run
        if plan.vae_tiling and max(width, height) > plan.tile:  # the image was decoded in tiles
            parameters["vae_tiling"] = plan.tile
        if cache is not None:
            parameters["cache"] = cache.label()
            parameters["cache_computed_steps"] = prof.steps_computed()
            parameters.update(measured)
        return Result(picture, final, parameters, prof.result(), warnings)


def _sampler_label(sched) -> str:
    """The sampler's AUTOMATIC1111 name, with " Karras" when it runs Karras sigmas ("DPM++ 2M Karras")."""
    karras = sched.config.get("use_karras_sigmas") and not sched.sampler_name.endswith("Karras")
    return f"{sched.sampler_name} Karras" if karras else sched.sampler_name


def _scheduler_config(folder: Path) -> dict:
    return read_scheduler(folder / "scheduler")


def load_pipeline(
    folder,
    *,
    threads: int | None = None,
    skip: tuple[str, ...] = (),
    available_mb: float | None = None,
    policy: str | None = None,
    graph_factory=Graph,
    **generation,
) -> Pipeline:
    """``generation``: ``width``, ``height``, ``guidance``, ``image``, ``vae_tiling`` of the generation the memory
    plan is made for (see ``Pipeline``)."""
    if folder is None:
        raise EngineError("no exported model given; export one with `stepwise export`")
    try:
        family = manifest_format.read(folder, check_files=False).family
    except manifest_format.ManifestError:
        family = None  # Pipeline reads it again and says what is wrong
    if family in CASCADES:
        from .cascade import CascadePipeline as pipeline_class
    else:
        pipeline_class = Pipeline
    return pipeline_class(
        Path(folder),
        threads=threads,
        skip=skip,
        available_mb=available_mb,
        policy=policy,
        graph_factory=graph_factory,
        **generation,
    )


__all__ = ["Pipeline", "Result", "load_pipeline"]
