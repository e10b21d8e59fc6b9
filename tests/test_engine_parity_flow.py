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


def sd3_export(exported_tiny):
    """The tiny SD 3 with its step-cache split (one export for this file: the plain runs use its whole graph,
    as an export without the split would, and the MagCache runs its split)."""
    return exported_tiny("sd3", cache_graphs=True)


@pytest.mark.slow
@pytest.mark.parametrize("width, height, steps, no_t5", [(64, 64, 3, False), (64, 48, 2, False), (64, 64, 2, True)])
def test_sd3_matches_diffusers(exported_tiny, width, height, steps, no_t5):
    pipe = engine.load_pipeline(sd3_export(exported_tiny), threads=1, skip=("text_encoder_3",) if no_t5 else ())
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


# --- SD 3 with MagCache against diffusers' hook on StableDiffusion3Pipeline ---------------------------------


def _sd3_magcache_reference(noise, steps, config):
    """diffusers' image with ``apply_mag_cache(transformer, config)``, its last step's latents, which calls ran
    the last block (a pre-hook on its norm1 fires only when the hook lets it compute: one call a step, CFG's
    two halves batched), and what the calibration printed (``calibrate=True``)."""
    import contextlib
    import io

    from diffusers.hooks import apply_mag_cache

    from tests.test_step_cache import _step_verdicts

    ref = tiny.build("sd3")
    apply_mag_cache(ref.transformer, config)
    events: list[str] = []
    ref.transformer.register_forward_pre_hook(lambda *_: events.append("step"))
    ref.transformer.transformer_blocks[-1].norm1.register_forward_pre_hook(lambda *_: events.append("rest"))
    printed, latents = io.StringIO(), []

    def keep(pipe, index, t, tensors):
        latents.append(tensors["latents"].numpy().copy())
        return tensors

    with contextlib.redirect_stdout(printed):
        image = run_reference(
            ref, torch.from_numpy(noise), num_inference_steps=steps, guidance_scale=7.0, width=64, height=48,
            max_sequence_length=256, callback_on_step_end=keep,
        )  # fmt: skip
    return image, latents[-1], _step_verdicts(events, "cached"), printed.getvalue()


@pytest.mark.slow
def test_sd3_magcache_matches_diffusers_hook_and_its_calibration(exported_tiny):
    """MagCache on SD 3 against diffusers 0.39's hook on StableDiffusion3Pipeline, from the same noise: the same
    steps computed, the same image within 2/255 and the same latents within 1e-4, with FLUX's ratios (none
    are published for SD 3; the defaults run on FLUX in tests/test_step_cache.py, so other values here:
    computed, computed, cached, cached, computed, cached, cached, computed). Then ``calibrate=true``: every step
    computed, and the ratios diffusers' calibration prints, within 1e-4; that run is also the uncached one,
    whose latents are ~0.03 from the cached reference's (the tiny model's blocks move its image little: the
    cache changes it by ~3/255), so the latent comparison can fail."""
    import ast

    from diffusers.hooks import MagCacheConfig
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    from registry import cache as step_cache

    steps = 8
    pipe = engine.load_pipeline(sd3_export(exported_tiny), threads=1)
    noise = np.random.default_rng(5).standard_normal(pipe.family.latent_shape(64, 48), dtype=np.float32)
    common = dict(prompt=PROMPT, steps=steps, guidance=7.0, width=64, height=48, seed=0, latents=noise)

    spec = step_cache.parse("magcache:threshold=0.1,max_skip_steps=2,mag_ratios=flux").resolved(steps)
    result = pipe.generate(**common, cache=spec)
    options = {k: v for k, v in spec.options.items() if k != "mag_ratios"}
    expected, latents, verdicts, _ = _sd3_magcache_reference(
        noise, steps, MagCacheConfig(**options, mag_ratios=FLUX_MAG_RATIOS)
    )
    ours = [s["cache"] for s in result.profile["steps"]]
    assert ours == verdicts and "cached" in ours and ours.count("computed") >= 3
    assert ours == ["computed" if c else "cached" for c in spec.schedule(steps)]  # what the plan announced
    assert_close(result.image, expected)
    error = np.abs(result.latents - latents).max()
    assert error < 1e-4
    assert result.parameters["cache"] == spec.label() and "mag_ratios=flux" in spec.label()
    assert result.parameters["cache_computed_steps"] == f"{ours.count('computed')} of {steps}"

    spec = step_cache.parse("magcache:calibrate=true").resolved(steps)
    calibrated = pipe.generate(**common, cache=spec)
    expected, _, verdicts, printed = _sd3_magcache_reference(
        noise, steps, MagCacheConfig(num_inference_steps=steps, calibrate=True)
    )
    assert [s["cache"] for s in calibrated.profile["steps"]] == verdicts == ["computed"] * steps
    assert_close(calibrated.image, expected)
    assert np.abs(calibrated.latents - latents).max() > 50 * error  # uncached vs the cached reference
    theirs = ast.literal_eval(printed.strip().splitlines()[-1])
    measured = ast.literal_eval(calibrated.parameters["cache_mag_ratios"])
    assert len(measured) == len(theirs) == steps and len(set(theirs)) > 2
    np.testing.assert_allclose(measured, theirs, atol=1e-4)
    assert step_cache.parse(f"magcache:mag_ratios={calibrated.parameters['cache_mag_ratios']}").options["mag_ratios"]


# --- SD 3 with First Block Cache and TaylorSeer-Lite against diffusers' hooks ---------------------------------


def _returns_encoder_states(block) -> None:
    """SD3's last block (built context_pre_only) returns None for the encoder states, which the transformer
    then discards; diffusers 0.39's First Block Cache and TaylorSeer hooks read every output of the block they
    wrap, and fail on None (test_step_cache.py checks that). Returning zeros of the input's shape instead
    changes no number the transformer uses, and lets diffusers' own hooks run: the reference."""
    run = block.forward

    def forward(*args, **kwargs):
        encoder, hidden = run(*args, **kwargs)
        return (torch.zeros_like(kwargs["encoder_hidden_states"]) if encoder is None else encoder), hidden

    block.forward = forward


def _last_block_ran(transformer):
    return transformer.transformer_blocks[-1].norm1


def _sd3_hook_reference(noise, steps, apply, config, probe=_last_block_ran, block_hooked=True):
    """diffusers' StableDiffusion3Pipeline with ``apply(transformer, config)``, under one cache context (the
    pipeline sets none; these hooks need one), and which calls ran the last block (``probe``: its norm1 fires
    only then; TaylorSeer's default mode runs it every call, and its attention's to_q only when computed).
    ``block_hooked``: the hook wraps the blocks, so the last one returns zeros for its dropped encoder states
    (TaylorSeer's default mode hooks the attention modules only: diffusers runs unchanged)."""
    from diffusers.hooks import HookRegistry

    from tests.test_step_cache import _step_verdicts

    ref = tiny.build("sd3")
    if block_hooked:
        _returns_encoder_states(ref.transformer.transformer_blocks[-1])
    apply(ref.transformer, config)
    HookRegistry.check_if_exists_or_initialize(ref.transformer)._set_context("cond")
    events: list[str] = []
    ref.transformer.register_forward_pre_hook(lambda *_: events.append("step"))
    probe(ref.transformer).register_forward_pre_hook(lambda *_: events.append("rest"))
    latents = []

    def keep(pipe, index, t, tensors):
        latents.append(tensors["latents"].numpy().copy())
        return tensors

    image = run_reference(
        ref, torch.from_numpy(noise), num_inference_steps=steps, guidance_scale=7.0, width=64, height=48,
        max_sequence_length=256, callback_on_step_end=keep,
    )  # fmt: skip
    return image, latents[-1], _step_verdicts(events, "skipped")


@pytest.mark.slow
@pytest.mark.parametrize(
    "text",
    [
        "taylorseer:use_lite_mode=true,cache_interval=2,disable_cache_before_step=2",
        "fbcache:threshold=0.4",
        # the default mode: every attention output predicted, the rest run (its hook needs only the context)
        "taylorseer:cache_interval=2,disable_cache_before_step=2",
    ],
)
def test_sd3_fbcache_and_taylorseer_match_diffusers_hooks(exported_tiny, text):
    """First Block Cache, TaylorSeer-Lite and TaylorSeer on SD 3 against diffusers 0.39's hooks on
    StableDiffusion3Pipeline (the last block returning zeros for the encoder states it drops, see
    _returns_encoder_states), from the same noise: the same steps computed, the image within 2/255, the final
    latents within 1e-4; and the cached run's latents are farther than that from the uncached ones, so the
    comparison can fail (TaylorSeer's default mode: 2e-6 from diffusers', 6e-3 from the uncached run's; the tiny
    model's attention moves its image little, 1/255)."""
    import torch as _torch
    from diffusers.hooks import (
        FirstBlockCacheConfig,
        TaylorSeerCacheConfig,
        apply_first_block_cache,
        apply_taylorseer_cache,
    )

    from registry import cache as step_cache

    steps = 8
    pipe = engine.load_pipeline(sd3_export(exported_tiny), threads=1)
    noise = np.random.default_rng(5).standard_normal(pipe.family.latent_shape(64, 48), dtype=np.float32)
    common = dict(prompt=PROMPT, steps=steps, guidance=7.0, width=64, height=48, seed=0, latents=noise)
    spec = step_cache.parse(text).resolved(steps)
    result = pipe.generate(**common, cache=spec)
    if spec.mode == "fbcache":
        apply, config = apply_first_block_cache, FirstBlockCacheConfig(**spec.options)
    else:
        apply, config = (
            apply_taylorseer_cache,
            TaylorSeerCacheConfig(**spec.options, taylor_factors_dtype=_torch.float32),
        )
    default_taylorseer = spec.mode == "taylorseer" and not spec.options["use_lite_mode"]
    probe = (lambda t: t.transformer_blocks[-1].attn.to_q) if default_taylorseer else _last_block_ran
    expected, latents, verdicts = _sd3_hook_reference(noise, steps, apply, config, probe, not default_taylorseer)
    ours = [s["cache"] for s in result.profile["steps"]]
    assert [v if v == "computed" else "skipped" for v in ours] == verdicts
    assert ours.count("computed") >= 3 and len(set(ours)) == 2
    schedule = spec.schedule(steps)
    if schedule is not None:  # what the plan announced is what ran
        assert ours == ["computed" if c else step_cache.MODES[spec.mode].label_skipped for c in schedule]
    assert_close(result.image, expected)
    error = np.abs(result.latents - latents).max()
    assert error < 1e-4
    uncached = pipe.generate(**common).latents
    assert np.abs(uncached - latents).max() > 50 * max(error, 1e-6)
    assert result.parameters["cache"] == spec.label()
