"""A loaded pixel-space cascade (DeepFloyd IF) and its generations: encode the prompt → stage I → stage II →
(when exported) stage III, the x4 upscaler.

Stages I and II have no VAE: each stage's sample is the image. Stage III samples latents and decodes them with
its own VAE. ``engine.sampling.sample`` runs once per stage with the
stage's own UNet, scheduler, steps and guidance; what a stage produced conditions the next (engine/families/
deepfloyd_if.py says how). Like ``Pipeline`` it holds only what the export is; a generation lives in
``generate``'s frame.
"""

from __future__ import annotations

import functools
import statistics
from pathlib import Path

import numpy as np

import schedulers
from registry import manifest as manifest_format
from registry.verify import verify

from . import memory, sampling
from .errors import EngineError
from .families.deepfloyd_if import DeepFloydIFArchitecture, to_uint8, upscaler_image
from .loader import Sessions
from .memory import PHASED, RESIDENT, MemoryPlan
from .pipeline import Result, _sampler_label
from .profile import Profiler, StepBar
from .session import Graph
from .tokenize import PromptTokenizer
from .vae import TiledDecoder, Tiling, Vae


class CascadePipeline:
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
        cache=None,
    ):
        # no image-to-image and no step cache for a cascade: each is refused before loading; only stage III
        # has a VAE (``vae_tiling``: its decode in tiles, True; never, False; when nothing fits otherwise, None)
        del image, cache
        self.vae_tiling = vae_tiling
        self.folder = Path(folder)
        self.manifest = manifest_format.read(self.folder)
        verify(self.manifest)
        arch = DeepFloydIFArchitecture(self.manifest)
        self.architecture = arch
        missing = [n for n, needed in arch.components.items() if needed and n not in self.manifest.components]
        if missing or len(arch.stages) < 2:
            raise EngineError(
                f"{self.folder} lacks {', '.join(missing) or 'its stages'}, which DeepFloyd IF needs; export it again"
            )
        if "text_encoder" in skip or "text_encoder_3" in skip:  # --no-t5
            raise EngineError("DeepFloyd IF cannot run without its T5 encoder: it conditions every stage; drop --no-t5")
        self.phases = {"encode": ["text_encoder"], **{f"stage_{s.number}": [s.unet] for s in arch.stages}}
        upscaler = arch.stage_3
        if upscaler is not None:  # its own prompt encoding, UNet loop and VAE decode, one phase each
            if any(n not in self.manifest.components for n in (upscaler.text_encoder, upscaler.unet)):
                raise EngineError(f"{self.folder} lacks stage III's graphs; export it again")
            self.phases.update(
                encode_3=[upscaler.text_encoder], stage_3=[upscaler.unet], decode_3=[upscaler.vae_decoder]
            )
        self.memory = self.plan_memory(
            width, height, guidance=guidance, policy=policy, available_mb=available_mb, vae_tiling=vae_tiling
        )
        paths = {name: self.manifest.component_path(name) for names in self.phases.values() for name in names}
        self.sessions = Sessions(paths, threads=threads, policy=self.memory.policy, graph_factory=graph_factory)
        self.tokenizers = {
            "tokenizer": PromptTokenizer(self.folder / "tokenizer", arch.tokenizer_lengths()["tokenizer"])
        }
        if upscaler is not None:
            self.tokenizers[upscaler.tokenizer] = PromptTokenizer(self.folder / upscaler.tokenizer)
            self.vae_3 = Vae(upscaler.vae)

    @property
    def family(self):
        return self.architecture

    @property
    def load_ms(self) -> float:
        return self.sessions.load_ms

    @property
    def model_label(self) -> str:
        return self.manifest.model_id or self.folder.name

    @property
    def has_image_encoder(self) -> bool:
        return False

    @property
    def stages(self):
        return self.architecture.stages

    # --- memory: weights plus each UNet's activations at its own stage's size
    def plan_memory(
        self, width=None, height=None, *, guidance=None, policy=None, available_mb=None, vae_tiling=None, **_
    ) -> MemoryPlan:
        """Resident when it all fits, else phased; stage III's VAE decodes in tiles (diffusers' enable_tiling) when
        asked (``vae_tiling`` True) or when nothing fits without them (None): its mid-block attention at 1024x1024
        is over 65,536 tokens, 16 GiB a score tensor."""
        arch = self.architecture
        first = arch.stages[0]
        width, height = width or first.sample_size, height or first.sample_size
        policy = policy if policy is not None else getattr(getattr(self, "memory", None), "policy", None)
        have = available_mb if available_mb is not None else memory.available_memory_mb()
        tilings = [False] if arch.stage_3 is None or vae_tiling is False else [True] if vae_tiling else [False, True]
        untiled = None
        for tiled in tilings:
            need = self._needs(width, height, guidance, self._tiling_3() if tiled else None)
            resident = memory.OVERHEAD_MB + sum(need.values())
            phased = memory.OVERHEAD_MB + max(need.values())
            chosen_policy = policy or (RESIDENT if have is None or resident <= have else PHASED)
            chosen = resident if chosen_policy == RESIDENT else phased
            if have is None or chosen <= have:
                break
            untiled = chosen
        else:
            tiles = "with stage III's VAE in tiles, " if tiled else ""
            raise EngineError(
                f"DeepFloyd IF needs ~{chosen:,.0f} MB {chosen_policy} ({tiles}at {width}x{height}) and {have:,.0f} MB "
                f"is available; export it with --weights int8 --text-encoder-weights int8, or free memory"
            )
        if chosen_policy == PHASED:
            reason = "each stage's sessions are released before the next"
        else:
            reason = "it all fits in memory"
        tile = self._tiling_3().sample_size if tiled else None
        decoded = None
        if arch.stage_3 is not None:
            w, h = arch.stage_size(arch.stages[-1], width, height)
            decoded = (w * arch.stage_3.vae_scale_factor, h * arch.stage_3.vae_scale_factor)
        return MemoryPlan(
            chosen_policy,
            chosen,
            resident,
            phased,
            have,
            reason,
            width=width,
            height=height,
            vae_tiling=tiled,
            untiled_mb=untiled if tiled and vae_tiling is None else None,
            tile=tile,
            decoded=decoded,
        )

    def _tiling_3(self) -> Tiling:
        """Stage III's VAE tiles, as AutoencoderKL.enable_tiling() sizes them: its sample_size over its factor."""
        vae = self.architecture.stage_3.vae
        size = int(vae["vae_sample_size"])
        return Tiling(size, int(size / 2 ** (len(vae["vae_block_out_channels"]) - 1)))

    def _needs(self, width: int, height: int, guidance, tiling: Tiling | None) -> dict[str, float]:
        """Each phase's weights and activations, in MB: every UNet at its own stage's size."""
        arch = self.architecture
        batch = arch.denoiser_batch(guidance)
        upscaler = arch.stage_3
        need = {}
        for phase, names in self.phases.items():
            total = memory.weights_mb(self.manifest, names)
            for stage in arch.stages:
                if stage.unet in names:
                    w, h = arch.stage_size(stage, width, height)
                    total += memory.activation_mb(self.manifest, stage.unet, w, h, batch=batch)
            for name in names:
                if name.startswith("text_encoder"):
                    total += memory.activation_mb(self.manifest, name, width, height)
            if upscaler is not None and phase in ("stage_3", "decode_3"):
                # the latents are stage II's size; the VAE makes the output 4x that
                w, h = arch.stage_size(arch.stages[-1], width, height)
                if phase == "stage_3":
                    batch_3 = 2 if guidance is None or arch.uses_cfg(upscaler.guidance) else 1
                    total += memory.activation_mb(self.manifest, upscaler.unet, w, h, batch=batch_3)
                else:
                    f = upscaler.vae_scale_factor
                    layout = {
                        "sample_size": upscaler.vae["vae_sample_size"],
                        "block_out_channels": upscaler.vae["vae_block_out_channels"],
                        "mid_block_attention": upscaler.vae["vae_mid_block_attention"],
                    }
                    total += memory.activation_mb(
                        self.manifest, upscaler.vae_decoder, w * f, h * f, tiling=tiling, vae=layout, scale_factor=f
                    )
            need[phase] = total
        return need

    def _phase(self, name: str, prof: Profiler):
        return self.sessions.phase(self.phases[name], on_load=lambda ms: prof.add("phase_load", ms))

    def _check(self, stage):
        def check(step: sampling.Step) -> None:
            if not np.isfinite(step.latents).all():
                raise EngineError(
                    f"stage {stage.number}, step {step.index + 1} of {step.total}: the UNet's output made the image "
                    f"NaN or infinite (a broken export, or a guidance too large); export again or lower --guidance"
                )

        return check

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
        steps_2: int | None = None,
        guidance_2: float | None = None,
        steps_3: int | None = None,
        guidance_3: float | None = None,
        latents: np.ndarray | None = None,
        scheduler: str | dict | None = None,
        image=None,
        mask=None,
        strength: float | None = None,
        callback=None,
        show_progress: bool = False,
        vae_tiling: bool | None = None,
        cache=None,
    ) -> Result:
        """One image through every stage. ``steps``/``guidance``: stage I's; ``steps_2``/``guidance_2``: stage II's
        (default: the export's, IFSuperResolutionPipeline's 50 and 4.0). Random tensors are drawn from
        ``default_rng(seed)`` in diffusers' order: stage I's noise and its steps' variance noise, then stage II's
        noise, the noise of the upscaled image, and its steps' variance noise; with stage III (``steps_3``/
        ``guidance_3``, default the export's: StableDiffusionUpscalePipeline's 75 and 9.0), the noise of its input
        image, then its latents (and its scheduler's noise, none for DDIM). ``callback(step)`` sees every step of
        every stage (``Step`` has no stage: the profile's rows say which)."""
        given_options = (image, "--image"), (mask, "--mask"), (strength, "--strength"), (latents, "--latents")
        for given, what in (*given_options, (cache, "--cache")):
            if given is not None:
                raise EngineError(f"{what} is not supported for DeepFloyd IF; generate from the prompt alone")
        if scheduler is not None:
            raise EngineError("--scheduler is not supported for DeepFloyd IF: its stages sample with their own DDPM")
        arch = self.architecture
        first, second = arch.stages[0], arch.stages[1]
        width, height = width or first.sample_size, height or first.sample_size
        steps_2 = int(steps_2 or second.default_steps or 50)
        guidance_2 = second.guidance if guidance_2 is None else float(guidance_2)
        upscaler = arch.stage_3
        if upscaler is None and (steps_3 is not None or guidance_3 is not None):
            raise EngineError(
                f"{self.folder.name} has no stage III (the x4 upscaler); drop --steps-3, or export with --stage-3"
            )
        if upscaler is not None:
            steps_3 = int(steps_3 or upscaler.default_steps)
            guidance_3 = upscaler.guidance if guidance_3 is None else float(guidance_3)
        tiling = self.vae_tiling if vae_tiling is None else vae_tiling
        plan = self.plan_memory(width, height, guidance=guidance, policy=self.memory.policy, vae_tiling=tiling)
        prof = Profiler()
        prof.add("load", self.sessions.load_ms)
        rng = np.random.default_rng(seed)
        bar = StepBar(steps, show_progress)
        ignored = []
        guided = arch.uses_cfg(guidance) or arch.uses_cfg(guidance_2) or (upscaler and arch.uses_cfg(guidance_3))
        if negative_prompt and not guided:
            ignored.append("--negative is ignored: guidance 1 or below runs without classifier-free guidance")
            negative_prompt = ""
        bar.phase("encoding the prompt")
        with self._phase("encode", prof) as graphs, prof.section("text_encoder"):
            # one encoding serves both stages: with the negative prompt when either guides
            cond, warnings = arch.encode(graphs, self.tokenizers, prompt, negative_prompt, max(guidance, guidance_2))
        warnings = ignored + warnings

        sample, stage_rows, profiles = None, [], []
        for stage, n, scale in ((first, steps, guidance), (second, steps_2, guidance_2)):
            sched = schedulers.from_config(dict(stage.scheduler))
            sched.set_timesteps(n)
            w, h = arch.stage_size(stage, width, height)
            x = rng.standard_normal((1, stage.channels, h, w), dtype=np.float32) * np.float32(sched.init_noise_sigma)
            image_in = None
            if sample is not None:  # the previous stage's image, upscaled and noised (one more draw)
                noising = schedulers.from_config(dict(stage.image_noising_scheduler))
                noise = rng.standard_normal((1, sample.shape[1], h, w), dtype=np.float32)
                image_in = arch.noised_image(stage, sample, w, h, noise, noising)
            denoiser = functools.partial(arch.stage_denoiser, stage=stage, cond=cond, guidance=scale, image=image_in)
            sampled, rows = self._sample_stage(stage, denoiser, sched, x, rng, prof, bar, callback)
            stage_rows.append(rows)
            sample = sampled.latents
            profiles.append((stage, sched, w, h, sampled.steps_run))
        if upscaler is None:
            picture = to_uint8(sample)
        else:
            upscaled = self._upscale(
                sample, prompt, negative_prompt, steps_3, guidance_3, rng, prof, bar, callback, plan
            )
            picture, sample, rows, entry, more = upscaled
            stage_rows.append(rows)
            profiles.append(entry)
            warnings += [w for w in more if w not in warnings]
        bar.clear()
        out_w, out_h = profiles[-1][2], profiles[-1][3]
        sched_1 = profiles[0][1]
        parameters = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "steps": steps,
            "guidance": guidance,
            "seed": seed,
            "width": out_w,
            "height": out_h,
            "model": self.model_label,
            "scheduler": sched_1.name,
            "sampler": _sampler_label(sched_1),
            "stage_1_size": f"{width}x{height}",
            "steps_2": steps_2,
            "guidance_2": guidance_2,
            "noise_level_2": second.noise_level,
        }
        if upscaler is not None:
            parameters.update(
                steps_3=steps_3,
                guidance_3=guidance_3,
                noise_level_3=upscaler.noise_level,
                sampler_3=_sampler_label(profiles[-1][1]),
            )
        result = prof.result()
        result["stages"] = [
            _stage_profile(stage, rows, w, h) for (stage, _, w, h, _), rows in zip(profiles, stage_rows, strict=True)
        ]
        return Result(picture, sample, parameters, result, warnings)

    def _sample_stage(self, stage, make_denoiser, sched, x, rng, prof: Profiler, bar, callback):
        """One stage's loop in its own phase (``make_denoiser(graph)`` builds its denoiser on the stage's UNet
        graph). → (the sampler's result, the profile's rows of its steps, marked with the stage)."""
        bar.phase(f"loading stage {stage.number}")
        watch = sampling.callbacks(self._check(stage), prof.on_step, bar.on_step, callback)
        before = len(prof.steps)
        with self._phase(f"stage_{stage.number}", prof) as graphs:
            bar.begin_steps(len(sched.timesteps))
            denoise = make_denoiser(graphs[stage.unet])
            sampled = sampling.sample(denoise, sched, x, rng=rng, callback=watch)
            del denoise
        rows = prof.steps[before:]
        for row in rows:
            row["stage"] = stage.number
        if sampled.stopped:
            raise EngineError(f"stage {stage.number} was stopped after {sampled.steps_run} steps")
        return sampled, rows

    def _upscale(self, image, prompt, negative, steps, guidance, rng, prof: Profiler, bar, callback, plan):
        """Stage III on stage II's image, as StableDiffusionUpscalePipeline: its CLIP encodes the prompt, one draw
        noises the image at ``noise_level``, one draws the latents, its loop runs, its VAE decodes (in tiles when
        the plan says so). → (picture, latents, the profile's rows, (stage, scheduler, w, h, steps run), warnings)."""
        arch, upscaler = self.architecture, self.architecture.stage_3
        bar.phase("encoding the prompt for stage 3")
        with self._phase("encode_3", prof) as graphs, prof.section("text_encoder"):
            tokenizer = self.tokenizers[upscaler.tokenizer]
            embeds, warnings = arch.encode_stage_3(graphs[upscaler.text_encoder], tokenizer, prompt, negative, guidance)
        sched = schedulers.from_config(dict(upscaler.scheduler))
        sched.set_timesteps(steps)
        image = upscaler_image(image, upscaler.vae_scale_factor)
        noising = schedulers.from_config(dict(upscaler.low_res_scheduler))
        noise = rng.standard_normal(image.shape, dtype=np.float32)
        image = noising.add_noise(image, noise, np.array([upscaler.noise_level], dtype=np.int64))
        h, w = image.shape[-2:]
        x = rng.standard_normal((1, upscaler.latent_channels, h, w), dtype=np.float32)
        x = x * np.float32(sched.init_noise_sigma)
        denoiser = functools.partial(
            arch.upscale_denoiser, stage=upscaler, embeds=embeds, image=image, guidance=guidance
        )
        sampled, rows = self._sample_stage(upscaler, denoiser, sched, x, rng, prof, bar, callback)
        bar.phase("decoding")
        with self._phase("decode_3", prof) as graphs, prof.section("vae_decode"):
            graph = graphs[upscaler.vae_decoder]
            graph = TiledDecoder(graph, self._tiling_3()) if plan.vae_tiling else graph
            picture = self.vae_3.decode(graph, sampled.latents)  # raises on NaN/Inf
        f = upscaler.vae_scale_factor
        return picture, sampled.latents, rows, (upscaler, sched, w * f, h * f, sampled.steps_run), warnings


def _stage_profile(stage, rows: list[dict], width: int, height: int) -> dict:
    step_ms = [r["denoiser_ms"] + r["scheduler_ms"] for r in rows]
    return {
        "stage": stage.number,
        "size": f"{width}x{height}",
        "steps": len(rows),
        "median_step_ms": round(statistics.median(step_ms), 3) if step_ms else 0.0,
        "total_ms": round(sum(step_ms), 3),
    }


__all__ = ["CascadePipeline"]
