"""Calibration inputs for static int8: the UNet's inputs along real sampling trajectories.

Activation ranges are taken from what the UNet sees when it samples: the diffusers pipeline is run on a few
prompts (``output_type="latent"``, no decode) and the UNet's inputs are recorded at every step. The engine's
loop produces the same numbers (tests/test_engine_parity.py), so these are the engine's trajectories, at
the step count and guidance the model is used with.
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
) -> list[tuple[dict, dict]]:
    """(the UNet's inputs, its output ``out_sample``) at each step of ``len(PROMPTS)`` seeded runs of
    ``pipeline`` (a diffusers UNet pipeline, still whole), sampled with ``scheduler`` (the config the export
    will carry; default the pipeline's own) and ``guidance`` (default the pipeline's)."""
    import diffusers
    import torch

    steps = max(1, min(steps, MAX_STEPS))
    width, height = _size(pipeline)
    recorded: list[tuple[dict, dict]] = []

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
                pipeline(
                    prompt,
                    num_inference_steps=steps,
                    width=width,
                    height=height,
                    generator=torch.Generator("cpu").manual_seed(seed),
                    output_type="latent",
                    **kwargs,
                )
    finally:
        hook.remove()
        pipeline.scheduler = original
    return recorded
