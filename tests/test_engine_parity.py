"""The engine against diffusers: same tiny weights, same initial latents, same scheduler, steps and guidance
→ the same image within 2/255 per pixel channel.

The reference is the diffusers pipeline run in PyTorch on the very modules the export came from
(``exporters.tiny.build`` is deterministic). Stochastic samplers (Euler Ancestral, LCM) draw their per-step
noise from a numpy Generator in the engine; the diffusers run gets the same draws by patching its
``randn_tensor`` in the scheduler's module, so the comparison covers every step, not just the last.
"""

from __future__ import annotations

import numpy as np
import pytest

import registry

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import engine  # noqa: E402
from exporters import tiny  # noqa: E402

MAX_PIXEL_DIFF = 2  # out of 255, per channel
SEED = 1234


def diffusers_scheduler(config: dict):
    config = dict(config)
    return getattr(diffusers, config.pop("_class_name")).from_config(config)


def numpy_randn_patch(monkeypatch, module_name: str, seed: int):
    """Make diffusers' per-step noise in `module_name` the engine's: numpy default_rng(seed) draws, in order."""
    import importlib

    module = importlib.import_module(module_name)
    rng = np.random.default_rng(seed)

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32)).to(dtype or torch.float32)

    monkeypatch.setattr(module, "randn_tensor", randn_tensor)


# (tiny pipeline, registry model whose scheduler config is used, steps, guidance, width, height, noisy module)
CASES = [
    ("sd15", "sd15", 3, 7.5, 64, 64, None),
    ("sd15", "sd15", 2, 7.5, 96, 64, None),  # non-square
    ("sdxl", "sdxl", 3, 5.0, 64, 64, None),
    ("sdxl", "sdxl-turbo", 1, 0.0, 64, 64, None),
    ("sdxl", "sdxl-turbo", 4, 0.0, 64, 96, "diffusers.schedulers.scheduling_euler_ancestral_discrete"),
    ("sdxl", "sdxl-lightning", 4, 0.0, 64, 64, None),
    ("lcm", "lcm", 4, 8.0, 64, 64, "diffusers.schedulers.scheduling_lcm"),
]


def reference_image(name, model_id, steps, guidance, width, height, latents, negative=""):
    return diffusers_image(tiny.build(name), model_id, steps, guidance, width, height, latents, negative)


def diffusers_image(pipe, model_id, steps, guidance, width, height, latents, negative=""):
    """diffusers' image of the parity prompt from ``pipe`` with ``model_id``'s scheduler and these latents."""
    pipe.scheduler = diffusers_scheduler(registry.get(model_id).scheduler)
    kwargs = dict(
        num_inference_steps=steps,
        guidance_scale=guidance,
        width=width,
        height=height,
        latents=torch.from_numpy(latents),
        output_type="np",
    )
    if negative:
        kwargs["negative_prompt"] = negative
    with torch.no_grad():
        image = pipe("a red apple on a table", **kwargs).images[0]
    return (image * 255).round().astype(np.uint8)


def engine_image(folder, model_id, steps, guidance, width, height, seed):
    """The engine's image of the parity prompt on ``folder`` with ``model_id``'s scheduler, from the seeded
    initial latents (returned too, for the reference run)."""
    pipe = engine.load_pipeline(folder, threads=1)
    pipe.scheduler_config = registry.get(model_id).scheduler
    latents = np.random.default_rng(7).standard_normal(pipe.family.latent_shape(width, height), dtype=np.float32)
    result = pipe.generate(
        prompt="a red apple on a table",
        steps=steps,
        guidance=guidance,
        width=width,
        height=height,
        seed=seed,
        latents=latents,
    )
    return result.image, latents


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, model_id, steps, guidance, width, height, noisy",
    CASES,
    ids=[f"{c[1]}-{c[2]}steps-{c[4]}x{c[5]}" for c in CASES],
)
def test_engine_matches_diffusers(exported_tiny, monkeypatch, name, model_id, steps, guidance, width, height, noisy):
    image, latents = engine_image(exported_tiny(name), model_id, steps, guidance, width, height, seed=SEED)
    if noisy:
        numpy_randn_patch(monkeypatch, noisy, SEED)
    expected = reference_image(name, model_id, steps, guidance, width, height, latents * 1.0)

    assert image.shape == expected.shape == (height, width, 3)
    diff = np.abs(image.astype(int) - expected.astype(int)).max()
    assert diff <= MAX_PIXEL_DIFF, f"max pixel difference {diff}/255"
    # and the image is not trivially flat: a broken pipeline that outputs grey would also "match" grey
    assert expected.std() > 5


@pytest.mark.slow
def test_negative_prompt_matches_diffusers(exported_tiny):
    folder = exported_tiny("sd15")
    pipe = engine.load_pipeline(folder, threads=1)
    latents = np.random.default_rng(3).standard_normal(pipe.family.latent_shape(64, 64), dtype=np.float32)
    result = pipe.generate(
        prompt="a red apple on a table",
        negative_prompt="blurry, dark",
        steps=2,
        guidance=7.5,
        width=64,
        height=64,
        seed=0,
        latents=latents,
    )
    expected = reference_image("sd15", "sd15", 2, 7.5, 64, 64, latents, negative="blurry, dark")
    assert np.abs(result.image.astype(int) - expected.astype(int)).max() <= MAX_PIXEL_DIFF
