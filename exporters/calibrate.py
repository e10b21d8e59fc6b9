"""Calibration inputs for the VAE decoder's static int8 (``--vae-weights int8``): decodes of real samples.

The diffusers pipeline is run on a few prompts (``output_type="latent"``, no decode) at the step count and
guidance the model is used with; the engine's loop produces the same latents (tests/test_engine_parity.py).
Their decodes, and those of as many standard-normal latents, calibrate the decoder's activation ranges.
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


def final_latents(
    pipeline, *, steps: int, guidance: float | None, scheduler: dict | None = None, progress=None
) -> list[np.ndarray]:
    """The final latents of ``len(PROMPTS)`` seeded runs of ``pipeline`` (a diffusers UNet pipeline, still whole),
    sampled with ``scheduler`` (the config the export will carry; default the pipeline's own) and ``guidance``
    (default the pipeline's)."""
    import diffusers
    import torch

    steps = max(1, min(steps, MAX_STEPS))
    width, height = _size(pipeline)
    finals: list[np.ndarray] = []
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
        pipeline.scheduler = original
    return finals


def vae_decoder_trajectory(pipeline, latents: list[np.ndarray], seed: int = 101) -> list[tuple[dict, dict]]:
    """(the decoder's input ``latent_sample``, PyTorch's decoded ``sample``) for sampled ``latents`` and as many
    standard-normal ones (the range a decoder sees from a half-finished or unusual sample), scaled as the
    engine scales them (engine/vae.py)."""
    import torch

    vae = pipeline.vae
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    rng = np.random.default_rng(seed)
    inputs = list(latents) + [rng.standard_normal(z.shape, dtype=np.float32) for z in latents]
    pairs = []
    for z in inputs:
        scaled = (z / scale + shift).astype(np.float32)
        with torch.inference_mode():
            image = vae.decode(torch.from_numpy(scaled), return_dict=False)[0]
        pairs.append(({"latent_sample": scaled}, {"sample": image.float().numpy().copy()}))
    return pairs
