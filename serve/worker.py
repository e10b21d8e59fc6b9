"""The models a server holds and the one queue each runs its requests through; no HTTP here.

A ``ModelWorker`` keeps one export's pipeline loaded and runs generations one at a time, in order, on its own
thread (a single-thread executor: requests wait in the order they came). One at a time is the point: on a
CPU a generation already uses every core through ONNX Runtime's intra-op threads, so two denoising loops side
by side only fight over them. A ``Job`` is one request — one or more images with consecutive seeds — and
carries its progress (step, preview latents) for ``/sdapi/v1/progress`` and the events that stop it: ``cancel``
(the client went away or the server is stopping: the result is dropped) and ``interrupt`` (AUTOMATIC1111's
interrupt: the image so far is decoded and returned, and no further image of the batch is started).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

import registry
from registry import policy, timings
from registry.manifest import ManifestError
from registry.requests import Plan


class ModelError(Exception):
    """A model the server cannot hold (unknown, not exported, unloadable): one line, what to do."""


class Cancelled(Exception):
    """A job dropped before it finished: its client went away, or the server is shutting down."""


@dataclass
class Job:
    plan: Plan
    count: int = 1  # images, seeds plan.seed, plan.seed + 1, … (AUTOMATIC1111's batch_size x n_iter)
    scheduler: str | dict | None = None
    image: object = None  # PIL image: image-to-image
    mask: object = None  # PIL image: inpainting, white is repainted
    kind: str = "txt2img"  # or img2img: what /sdapi/v1/progress calls the job
    cancel: threading.Event = field(default_factory=threading.Event)
    interrupt: threading.Event = field(default_factory=threading.Event)
    why_cancelled: str = "the client went away"
    # progress, written by the worker thread
    created: float = field(default_factory=time.time)
    started: float | None = None
    index: int = 0  # the image being made
    step: int = 0  # steps done of the current image
    total_steps: int = 0
    step_ms: list = field(default_factory=list)  # of the current image
    latents: np.ndarray | None = None  # the current image's latest estimate (for the preview)
    done: bool = False

    @property
    def seeds(self) -> list[int]:
        return [(self.plan.seed + i) % (policy.MAX_SEED + 1) for i in range(self.count)]

    @property
    def progress(self) -> float:
        if self.done:
            return 1.0
        if not self.total_steps:
            return self.index / self.count
        return (self.index + self.step / self.total_steps) / self.count

    def stop(self, step) -> bool:
        """The sampling callback: records the step; False stops the loop there (the image so far is decoded),
        Cancelled leaves it at once (nothing is decoded)."""
        self.step = step.index + 1
        self.total_steps = step.total
        self.step_ms.append(round(step.denoiser_ms + step.scheduler_ms, 3))
        latest = step.denoised if step.denoised is not None else step.latents
        self.latents = np.array(latest, copy=True)
        if self.cancel.is_set():
            raise Cancelled(self.why_cancelled)
        return not self.interrupt.is_set()


@dataclass
class Output:
    results: list  # engine.Result, one per image made
    pngs: list[bytes]  # the PNG of each, with the CLI's metadata
    interrupted: bool


class ModelWorker:
    """One model: its registry policy, its export, its loaded pipeline and its queue."""

    def __init__(self, spec: str, *, threads: int | None = None, low_memory: bool = False):
        import cli

        try:
            target = cli.resolve_model(spec)
        except cli.Failure as exc:
            raise ModelError(str(exc)) from None
        if target.folder is None:
            raise ModelError(cli.not_exported_message(target))
        self.spec = spec
        self.target = target
        self.threads = threads
        self.low_memory = low_memory
        from registry import manifest

        try:
            found = manifest.read(target.folder, check_files=False)
        except ManifestError as exc:
            raise ModelError(str(exc)) from None
        # the export's id: what the PNG's Model field says, and the name clients ask for
        self.id = found.model_id or target.folder.name
        self.components = set(found.components)
        self.stage_3 = cli.has_stage_3(target)  # DeepFloyd IF exported with --stage-3
        # a cascade's later stages' steps for every request (serve --steps-2/--steps-3, given by load_workers;
        # None: each stage's default), judged with each request's force as generate judges them
        self.steps_2: int | None = None
        self.steps_3: int | None = None
        self.scheduler_config = _scheduler_config(target.folder)
        self.pipeline = None
        self._load_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stepwise-{self.id}")
        self.waiting: deque[Job] = deque()
        self.running: Job | None = None
        self.last_step_ms: dict[tuple[int, int], float] = {}  # measured in this process, by size
        self.served = self.cancelled = 0  # jobs finished / dropped

    # ------------------------------------------------------------ what clients see

    @property
    def model(self) -> registry.Model:
        return self.target.model

    @property
    def family(self) -> registry.Family:
        return self.target.family

    @property
    def size(self) -> tuple[int, int]:
        """The export's default size (a tiny stand-in's is small)."""
        return self.target.native_size or (self.model.width, self.model.height)

    @property
    def img2img(self) -> bool:
        return "vae_encoder" in self.components

    @property
    def extra(self) -> dict | None:
        """What the CLI adds to the PNG's parameters."""
        return {"weights": "random"} if self.target.random_weights else None

    def describe(self) -> dict:
        """The model as ``GET /stepwise/v1/models`` lists it."""
        m, fam = self.model, self.family
        width, height = self.size
        return {
            "id": self.id,
            "name": m.name,
            "policy_model": m.id,
            "family": m.family,
            "default_steps": m.default_steps,
            "min_steps": m.min_steps,
            "max_useful_steps": m.max_useful_steps,
            "recommended_steps": list(m.recommended_steps),
            "guidance": m.guidance,
            "cfg": m.cfg,
            "guidance_embedded": m.guidance_embedded,
            "width": width,
            "height": height,
            "size_multiple": fam.size_multiple,
            "min_size": fam.min_size,
            "max_size": fam.max_size,
            "img2img": self.img2img,
            "random_weights": self.target.random_weights,
            "weights": self.target.weights,
            "folder": str(self.target.folder),
            "loaded": self.pipeline is not None,
            "step_s": self.step_seconds(width, height),
        }

    def step_seconds(self, width: int, height: int) -> float | None:
        """A step's time at this size: measured in this process, else by an earlier CLI run on this machine."""
        ms = self.last_step_ms.get((width, height))
        if ms is not None:
            return round(ms / 1000, 4)
        try:
            return timings.step_seconds(self.target.label, width, height, self.threads)
        except (OSError, ValueError):
            return None

    # ------------------------------------------------------------ running

    def load(self):
        """The pipeline, loaded on first use and kept (resident unless low_memory: phased)."""
        with self._load_lock:
            if self.pipeline is None:
                import engine

                width, height = self.size
                self.pipeline = engine.load_pipeline(
                    self.target.folder,
                    threads=self.threads,
                    policy=engine.PHASED if self.low_memory else engine.RESIDENT,
                    width=width,
                    height=height,
                )
            return self.pipeline

    def submit(self, job: Job) -> asyncio.Future:
        """Queue the job; the future resolves to its Output (or raises Cancelled, EngineError, …)."""
        self.waiting.append(job)
        return asyncio.get_running_loop().run_in_executor(self._executor, self._run, job)

    def cancel_all(self, why: str, running: bool) -> None:
        """Drop every waiting job (and the running one when ``running``): the server is stopping."""
        jobs = list(self.waiting) + ([self.running] if running and self.running else [])
        for job in jobs:
            job.why_cancelled = why
            job.cancel.set()

    def close(self) -> None:
        self.cancel_all("the server is shutting down", running=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _run(self, job: Job) -> Output:
        try:
            self.waiting.remove(job)
        except ValueError:
            pass
        if job.cancel.is_set():
            self.cancelled += 1
            raise Cancelled(job.why_cancelled)
        self.running = job
        job.started = time.time()
        try:
            out = self._generate(job)
            self.served += 1
            return out
        except Cancelled:
            self.cancelled += 1
            raise
        finally:
            job.done = True
            self.running = None

    def _generate(self, job: Job) -> Output:
        import engine

        pipe = self.load()
        plan = job.plan
        results, pngs, interrupted = [], [], False
        for i, seed in enumerate(job.seeds):
            if job.cancel.is_set():
                raise Cancelled(job.why_cancelled)
            if job.interrupt.is_set():
                interrupted = True
                break
            job.index, job.step, job.step_ms, job.latents = i, 0, [], None
            result = pipe.generate(
                **plan.stage_steps,
                prompt=plan.prompt,
                negative_prompt=plan.negative,
                steps=plan.steps,
                guidance=plan.guidance,
                width=plan.width,
                height=plan.height,
                seed=seed,
                scheduler=job.scheduler,
                image=job.image,
                mask=job.mask,
                strength=plan.strength,
                callback=job.stop,
                cache=plan.cache,
            )
            if job.cancel.is_set():
                raise Cancelled(job.why_cancelled)
            stopped = job.interrupt.is_set()  # the image is what the steps so far made
            interrupted = interrupted or stopped
            if result.profile.get("median_step_ms"):
                self.last_step_ms[(plan.width, plan.height)] = result.profile["median_step_ms"]
            results.append(result)
            pngs.append(engine.png_bytes(result, self.extra))
            if stopped:
                break
        return Output(results, pngs, interrupted)

    def preview(self) -> bytes | None:
        """The running image as a small PNG, decoded cheaply from its latest latents (no VAE)."""
        job = self.running
        pipe = self.pipeline
        if job is None or job.latents is None or pipe is None:
            return None
        width, height = job.plan.width, job.plan.height
        try:
            latents = pipe.architecture.unpack(job.latents, width, height)
        except Exception:  # a preview is never worth failing a progress poll
            return None
        return preview_png(latents, self.family.name)


def _scheduler_config(folder) -> dict:
    """The export's own scheduler config (the sampler a request without sampler_name runs), read as the engine
    reads it."""
    from engine.errors import EngineError
    from engine.pipeline import _scheduler_config as read

    try:
        return read(folder)
    except EngineError as exc:
        raise ModelError(str(exc)) from None


# AUTOMATIC1111's "Approx cheap" previews: a linear map from the 4 latent channels to RGB
LATENT_RGB = {
    "sd15": np.array(
        [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]], np.float32
    ),
    "sdxl": np.array(
        [[0.3448, 0.4168, 0.4395], [-0.1953, -0.0290, 0.0250], [0.1074, 0.0886, -0.0163], [-0.3730, -0.2499, -0.2088]],
        np.float32,
    ),
}


def preview_rgb(latents: np.ndarray, family: str) -> np.ndarray:
    """(1, C, h, w) latents → (h, w, 3) uint8: the 4-channel families through their linear map, the others
    (16-channel SD3/FLUX/Qwen latents) as three channel groups' means, stretched to the full range."""
    x = np.nan_to_num(np.asarray(latents, np.float32)[0], nan=0.0, posinf=0.0, neginf=0.0)
    if x.ndim == 4:  # a video VAE's frame axis (Qwen-Image): the one frame
        x = x[:, 0]
    factors = LATENT_RGB.get(family)
    if factors is not None and x.shape[0] == factors.shape[0]:
        rgb = np.einsum("chw,cr->hwr", x, factors)
        rgb = (rgb + 1) / 2
    else:
        groups = np.array_split(x, 3, axis=0)
        rgb = np.stack([g.mean(axis=0) for g in groups], axis=-1)
        lo, hi = rgb.min(), rgb.max()
        rgb = (rgb - lo) / (hi - lo) if hi > lo else np.zeros_like(rgb)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def preview_png(latents: np.ndarray, family: str) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(preview_rgb(latents, family)).save(buffer, format="PNG")
    return buffer.getvalue()


def load_workers(
    specs: list[str],
    *,
    threads: int | None = None,
    low_memory: bool = False,
    steps_2: int | None = None,
    steps_3: int | None = None,
) -> dict[str, ModelWorker]:
    """The workers for ``--model`` specs, by id; two specs naming the same export id are refused.

    ``steps_2``/``steps_3`` go to the models that have that stage (a server may hold a cascade beside one-stage
    models); one no model has is refused with ``generate``'s message for the first model."""
    if not specs:
        raise ModelError("name at least one model to serve: --model ID|FOLDER")
    workers: dict[str, ModelWorker] = {}
    for spec in specs:
        worker = ModelWorker(spec, threads=threads, low_memory=low_memory)
        if worker.id in workers:
            raise ModelError(f"two --model name the id {worker.id!r} ({workers[worker.id].spec} and {spec}); serve one")
        workers[worker.id] = worker
    _give_stage_steps(list(workers.values()), steps_2, steps_3)
    return workers


def _give_stage_steps(workers: list[ModelWorker], steps_2: int | None, steps_3: int | None) -> None:
    if steps_2 is not None:
        for worker in [w for w in workers if w.model.stages] or workers[:1]:
            _check_stage_steps(worker, steps_2, None)
            worker.steps_2 = steps_2
    if steps_3 is not None:
        for worker in [w for w in workers if w.stage_3] or workers[:1]:
            _check_stage_steps(worker, None, steps_3)
            worker.steps_3 = steps_3


def _check_stage_steps(worker: ModelWorker, steps_2: int | None, steps_3: int | None) -> None:
    """Refuse what no request could run (a stage the model or its export lacks, a count below 1); the policy's
    verdict on the count is each request's, with its ``force``, as for ``steps``."""
    from registry.policy import InputError
    from registry.requests import stage_decisions

    try:
        stage_decisions(worker.model, steps_2, steps_3, stage_3=worker.stage_3, force=True)
    except InputError as exc:
        raise ModelError(f"{worker.spec}: {exc}") from None


__all__ = ["Cancelled", "Job", "ModelError", "ModelWorker", "Output", "load_workers", "preview_png", "preview_rgb"]
