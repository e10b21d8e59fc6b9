"""Calibration inputs for the static int8 modes: the UNet's inputs along real sampling trajectories.

Activation ranges are taken from what the UNet sees when it samples: the diffusers pipeline is run on a few
prompts (``output_type="latent"``, no decode) and the UNet's inputs are recorded at every step
(``--weights int8-static``); the final latents' decodes calibrate the VAE decoder (``--vae-weights int8``). The
engine's loop produces the same numbers (tests/test_engine_parity.py), so these are the engine's trajectories,
at the step count and guidance the model is used with.
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
