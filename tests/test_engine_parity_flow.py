"""Flow-matching transformers (SD3, FLUX) against diffusers: same tiny weights, same initial latents, same
steps and guidance → the same image within 2/255 per pixel channel, at a square and a non-square size
(which exercises FLUX's 2x2 packing and positional ids). The FLUX reference packs the noise with diffusers'
own ``FluxPipeline._pack_latents``, not with ours.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import engine  # noqa: E402
from exporters import tiny  # noqa: E402

MAX_PIXEL_DIFF = 2
PROMPT = "a cat holding a sign that says hello"


def run_reference(pipe, latents, **kwargs):
    with torch.no_grad():
        image = pipe(PROMPT, latents=latents, output_type="np", **kwargs).images[0]
    return (image * 255).round().astype(np.uint8)


def assert_close(ours, expected):
    assert ours.shape == expected.shape
    diff = np.abs(ours.astype(int) - expected.astype(int)).max()
    assert diff <= MAX_PIXEL_DIFF, f"max pixel difference {diff}/255"
    assert expected.std() > 5  # a flat image would match anything flat


@pytest.mark.slow
@pytest.mark.parametrize("width, height, steps, no_t5", [(64, 64, 3, False), (64, 48, 2, False), (64, 64, 2, True)])
def test_sd3_matches_diffusers(exported_tiny, width, height, steps, no_t5):
    pipe = engine.load_pipeline(exported_tiny("sd3"), threads=1, skip=("text_encoder_3",) if no_t5 else ())
    noise = np.random.default_rng(5).standard_normal(pipe.family.latent_shape(width, height), dtype=np.float32)
    ours = pipe.generate(
        prompt=PROMPT, steps=steps, guidance=7.0, width=width, height=height, seed=0, latents=noise
    ).image
    ref = tiny.build("sd3")
    if no_t5:
        ref.text_encoder_3, ref.tokenizer_3 = None, None
    expected = run_reference(
        ref,
        torch.from_numpy(noise),
        num_inference_steps=steps,
        guidance_scale=7.0,
        width=width,
        height=height,
        max_sequence_length=256,
    )
    assert_close(ours, expected)


@pytest.mark.slow
@pytest.mark.parametrize("name, guidance, t5_length", [("flux-schnell", 0.0, 256), ("flux-dev", 3.5, 512)])
@pytest.mark.parametrize("width, height", [(64, 64), (64, 48)])
def test_flux_matches_diffusers(exported_tiny, name, guidance, t5_length, width, height):
    pipe = engine.load_pipeline(exported_tiny(name), threads=1)
    noise = np.random.default_rng(6).standard_normal(pipe.family.latent_shape(width, height), dtype=np.float32)
    ours = pipe.generate(
        prompt=PROMPT, steps=3, guidance=guidance, width=width, height=height, seed=0, latents=noise
    ).image
    ref = tiny.build(name)
    b, c, h, w = noise.shape
    packed = diffusers.FluxPipeline._pack_latents(torch.from_numpy(noise), b, c, h, w)
    expected = run_reference(
        ref,
        packed,
        num_inference_steps=3,
        guidance_scale=guidance,
        width=width,
        height=height,
        max_sequence_length=t5_length,
    )
    assert_close(ours, expected)
