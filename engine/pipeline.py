"""The one denoising loop, shared by every family: load, encode, sample step by step, decode, profile."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import schedulers
from registry import manifest as manifest_format

from .errors import EngineError
from .families import FAMILIES
from .memory import check_memory
from .profile import Profiler, StepBar
from .session import Graph
from .tokenize import PromptTokenizer
from .vae import VaeDecoder

# LatentConsistencyModelPipeline decodes the scheduler's denoised estimate, not the re-noised sample.
DECODES_DENOISED = {"LCMScheduler"}


@dataclass
class Result:
    image: np.ndarray  # (H, W, 3) uint8
    latents: np.ndarray  # the final latents that were decoded, unpacked (1, C, h, w)
    parameters: dict
    profile: dict
    warnings: list[str]


class Pipeline:
    def __init__(
        self, folder: Path, *, threads: int | None = None, skip: tuple[str, ...] = (), available_mb: float | None = None
    ):
        self.folder = Path(folder)
        self.manifest = manifest_format.read(self.folder)
        family_name = self.manifest.family
        if family_name not in FAMILIES:
            raise EngineError(f"{self.folder} holds a {family_name} model, which has no Stepwise engine yet")
        self.family_cls = FAMILIES[family_name]
        self.threads = threads
        wanted = [name for name in self.family_cls.components if name in self.manifest.components and name not in skip]
        required = [n for n, needed in self.family_cls.components.items() if needed] + ["vae_decoder"]
        missing = [n for n in required if n not in self.manifest.components]
        if missing:
            raise EngineError(
                f"{self.folder} lacks {', '.join(missing)}, which a {family_name} model needs; export the model again"
            )
        wanted.append("vae_decoder")
        check_memory(self.manifest, wanted, available_mb=available_mb)
        start = time.perf_counter()
        graphs = {name: Graph(self.manifest.component_path(name), threads) for name in wanted}
        lengths = self.family_cls.tokenizer_lengths(self.manifest.config)
        tokenizers = {}
        for name in wanted:
            if name.startswith("text_encoder"):
                tok = name.replace("text_encoder", "tokenizer")
                tokenizers[tok] = PromptTokenizer(self.folder / tok, lengths.get(tok))
        index_path = self.folder / "model_index.json"
        model_index = json.loads(index_path.read_text()) if index_path.is_file() else {}
        self.family = self.family_cls(self.manifest, graphs, tokenizers, model_index)
        config = self.manifest.config
        self.vae = VaeDecoder(
            graphs["vae_decoder"], float(config["vae_scaling_factor"]), config.get("vae_shift_factor")
        )
        self.scheduler_config = json.loads((self.folder / "scheduler" / "scheduler_config.json").read_text())
        self.load_ms = (time.perf_counter() - start) * 1000

    @property
    def model_label(self) -> str:
        return self.manifest.model_id or self.folder.name

    def make_scheduler(self, name: str | None):
        config = dict(self.scheduler_config)
        if name:
            config["_class_name"] = name
        try:
            return schedulers.from_config(config)
        except ValueError as exc:
            raise EngineError(f"--scheduler {name}: {exc}") from None

    def initial_noise(self, width: int, height: int, seed: int, latents: np.ndarray | None, rng) -> np.ndarray:
        shape = self.family.latent_shape(width, height)
        if latents is None:
            return rng.standard_normal(shape, dtype=np.float32)
        latents = np.asarray(latents, dtype=np.float32)
        if latents.shape != shape:
            raise EngineError(
                f"--latents has shape {latents.shape}, but {width}x{height} needs {shape}; "
                f"save standard-normal noise of that shape"
            )
        return latents

    def generate(
        self,
        *,
        prompt: str,
        negative_prompt: str = "",
        steps: int,
        guidance: float,
        width: int,
        height: int,
        seed: int,
        latents: np.ndarray | None = None,
        scheduler: str | None = None,
        show_progress: bool = False,
    ) -> Result:
        prof = Profiler()
        prof.sections["load"] = self.load_ms
        family = self.family
        family.warnings = []
        sched = self.make_scheduler(scheduler)
        rng = np.random.default_rng(seed)

        with prof.section("text_encoder"):
            cond = family.encode(prompt, negative_prompt, guidance)
        family.prepare(cond, width, height, guidance)
        family.set_timesteps(sched, steps, width, height)
        noise = self.initial_noise(width, height, seed, latents, rng)
        x = family.pack(noise * np.float32(sched.init_noise_sigma))

        sigmas = getattr(sched, "sigmas", None)
        bar = StepBar(len(sched.timesteps), show_progress)
        result = None
        for i, t in enumerate(sched.timesteps):
            t0 = time.perf_counter()
            model_in = sched.scale_model_input(x, t)
            output = family.denoise(model_in, t, cond, guidance)
            t1 = time.perf_counter()
            result = sched.step(output, t, x, generator=rng)
            x = result.prev_sample
            t2 = time.perf_counter()
            sigma = float(sigmas[i]) if sigmas is not None and i < len(sigmas) else None
            prof.step(i, float(t), sigma, (t1 - t0) * 1000, (t2 - t1) * 1000)
            bar.update(i + 1)

        if type(sched).__name__ in DECODES_DENOISED and result is not None:
            x = result.denoised
        final = family.unpack(x, width, height)
        with prof.section("vae_decode"):
            image = self.vae(final)
        parameters = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "steps": steps,
            "guidance": guidance,
            "seed": seed,
            "width": width,
            "height": height,
            "model": self.model_label,
            "scheduler": type(sched).__name__,
        }
        return Result(image, final, parameters, prof.result(), list(family.warnings))


def load_pipeline(
    folder, *, threads: int | None = None, skip: tuple[str, ...] = (), available_mb: float | None = None
) -> Pipeline:
    if folder is None:
        raise EngineError("no exported model given; export one with `stepwise export`")
    return Pipeline(Path(folder), threads=threads, skip=skip, available_mb=available_mb)


__all__ = ["Pipeline", "Result", "load_pipeline"]
