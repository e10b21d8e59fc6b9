"""Calibration inputs for the static int8 modes: the UNet's inputs along real sampling trajectories.

Activation ranges are taken from what the UNet sees when it samples: the diffusers pipeline is run on a few
prompts (``output_type="latent"``, no decode) and the UNet's inputs are recorded at every step
(``--weights int8-static``); the final latents' decodes calibrate the VAE decoder (``--vae-weights int8``). The
engine's loop produces the same numbers (tests/test_engine_parity.py), so these are the engine's trajectories,
at the step count and guidance the model is used with.

A transformer pipeline (SD 3, FLUX, HiDream) is never sampled in PyTorch: its denoiser is streamed, too big to
hold. Its decoder is calibrated on what it was trained to decode instead, its own encoder's latents of images
(``encoded_latents``): synthetic ones, as the export has no image data and no network.
"""

from __future__ import annotations

import numpy as np

PROMPTS = (
    "a photograph of an astronaut riding a horse on the moon",
    "a watercolor painting of a lighthouse on a cliff at sunset, detailed",
)
MAX_SIDE = 512  # calibration resolution cap: ranges barely depend on size; time does
MAX_STEPS = 4


def _size(pipeline) -> tuple[int, int]:
    scale = getattr(pipeline, "vae_scale_factor", 8)
    side = int(pipeline.unet.config.sample_size) * scale
    side = min(side, MAX_SIDE)
    return side, side


def _as_feeds(args: tuple, kwargs: dict) -> dict[str, np.ndarray]:
    """A ``UNet2DConditionModel`` call as the graph's named inputs (exporters/components.py ``unet``)."""
    sample = args[0] if args else kwargs["sample"]
    timestep = args[1] if len(args) > 1 else kwargs["timestep"]
    states = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
    if hasattr(timestep, "reshape"):  # the pipelines pass a 0-d tensor; the graph takes a float scalar
        timestep = float(timestep.reshape(-1)[0])
    feeds = {
        "sample": sample.detach().float().numpy().copy(),
        "timestep": np.asarray(timestep, np.float32),
        "encoder_hidden_states": states.detach().float().numpy().copy(),
    }
    added = kwargs.get("added_cond_kwargs") or {}
    for name in ("text_embeds", "time_ids"):
        if name in added:
            feeds[name] = added[name].detach().float().numpy().copy()
    if kwargs.get("timestep_cond") is not None:
        feeds["timestep_cond"] = kwargs["timestep_cond"].detach().float().numpy().copy()
    return feeds


def unet_trajectory(
    pipeline, *, steps: int, guidance: float | None, scheduler: dict | None = None, progress=None
) -> tuple[list[tuple[dict, dict]], list[np.ndarray]]:
    """(the UNet's inputs, its output ``out_sample``) at each step of ``len(PROMPTS)`` seeded runs of
    ``pipeline`` (a diffusers UNet pipeline, still whole), sampled with ``scheduler`` (the config the export
    will carry; default the pipeline's own) and ``guidance`` (default the pipeline's); and each run's final
    latents."""
    import diffusers
    import torch

    steps = max(1, min(steps, MAX_STEPS))
    width, height = _size(pipeline)
    recorded: list[tuple[dict, dict]] = []
    finals: list[np.ndarray] = []

    def record(_module, args, kwargs, output):
        sample = output[0] if isinstance(output, tuple) else output.sample
        recorded.append((_as_feeds(args, kwargs), {"out_sample": sample.detach().float().numpy().copy()}))

    hook = pipeline.unet.register_forward_hook(record, with_kwargs=True)
    pipeline.set_progress_bar_config(disable=True)
    original = pipeline.scheduler
    if scheduler:
        config = dict(scheduler)
        pipeline.scheduler = getattr(diffusers, config.pop("_class_name")).from_config(config)
    try:
        for seed, prompt in enumerate(PROMPTS):
            if progress:
                progress(f"calibrating: sampling {prompt[:40]!r} ({steps} steps, {width}x{height})")
            kwargs = {} if guidance is None else {"guidance_scale": guidance}
            with torch.inference_mode():
                result = pipeline(
                    prompt,
                    num_inference_steps=steps,
                    width=width,
                    height=height,
                    generator=torch.Generator("cpu").manual_seed(seed),
                    output_type="latent",
                    **kwargs,
                )
            finals.append(result.images.detach().float().numpy().copy())
    finally:
        hook.remove()
        pipeline.scheduler = original
    return recorded, finals


def _scaling(vae) -> tuple[float, float]:
    """(scaling_factor, shift_factor): the decoder reads ``latents / scale + shift`` (engine/vae.py)."""
    return float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


def vae_decoder_trajectory(pipeline, latents: list[np.ndarray], seed: int = 101) -> list[tuple[dict, dict]]:
    """(the decoder's input ``latent_sample``, PyTorch's decoded ``sample``) for sampled ``latents`` and as many
    standard-normal ones (the range a decoder sees from a half-finished or unusual sample), scaled as the
    engine scales them (engine/vae.py)."""
    import torch

    vae = pipeline.vae
    scale, shift = _scaling(vae)
    rng = np.random.default_rng(seed)
    inputs = list(latents) + [rng.standard_normal(z.shape, dtype=np.float32) for z in latents]
    pairs = []
    for z in inputs:
        scaled = (z / scale + shift).astype(np.float32)
        with torch.inference_mode():
            image = vae.decode(torch.from_numpy(scaled), return_dict=False)[0]
        pairs.append(({"latent_sample": scaled}, {"sample": image.float().numpy().copy()}))
    return pairs


def synthetic_images(count: int, side: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` (1, 3, side, side) images in [-1, 1] with what photographs have for a convolution's ranges:
    smooth colour gradients, flat shapes with hard edges, fine texture and saturated colour."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    images = []
    for _ in range(count):
        image = np.empty((3, side, side), np.float32)
        for c in range(3):  # a gradient and a few low-frequency waves per channel
            field = rng.uniform(-1, 1) * xx + rng.uniform(-1, 1) * yy
            for _ in range(3):
                fx, fy, phase = rng.uniform(0.5, 4.0), rng.uniform(0.5, 4.0), rng.uniform(0, 2 * np.pi)
                field += 0.3 * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
            image[c] = field
        for _ in range(6):  # flat discs and rectangles
            colour = rng.uniform(-1, 1, 3).astype(np.float32)[:, None]
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.25)
            if rng.random() < 0.5:
                mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
            else:
                mask = (np.abs(xx - cx) < r) & (np.abs(yy - cy) < r * rng.uniform(0.3, 1.5))
            image[:, mask] = colour
        image += rng.normal(0, 0.05, image.shape).astype(np.float32)  # sensor-like grain
        images.append(np.clip(image, -1, 1)[None])
    return images


def encoded_latents(pipeline, count: int = len(PROMPTS), seed: int = 0) -> list[np.ndarray]:
    """The VAE encoder's latents (its distribution's mean, as diffusers' pipelines take it) of ``count``
    synthetic images, in the pipeline's latent space — what ``vae_decoder_trajectory`` takes as final latents."""
    import torch

    vae = pipeline.vae
    scale, shift = _scaling(vae)
    default = getattr(pipeline, "default_sample_size", None) or 64
    side = min(int(default) * int(getattr(pipeline, "vae_scale_factor", 8)), MAX_SIDE)
    latents = []
    for image in synthetic_images(count, side, seed):
        with torch.inference_mode():
            mean = vae.encode(torch.from_numpy(image)).latent_dist.mean
        latents.append(((mean.float().numpy() - shift) * scale).astype(np.float32))
    return latents
