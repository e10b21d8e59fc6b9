"""Step caching (``--cache``) on Qwen-Image against diffusers 0.39's own hooks on QwenImagePipeline.

The reference is the tiny QwenImagePipeline the export came from, its transformer given
``enable_cache(<the same config>)``, fed the same packed noise, with true CFG on (a negative prompt,
true_cfg_scale 4): the pipeline runs the prompt in ``cache_context("cond")`` and the negative in
``cache_context("uncond")``, and each hook keeps one state per context, so the engine must keep one cache per
context too (engine/cache.py PerContext). Checked: the same calls computed in each context, and the image within
the project's 2/255.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

import engine  # noqa: E402
import registry  # noqa: E402
from exporters import tiny  # noqa: E402
from registry import cache as step_cache  # noqa: E402
from tests.test_engine_parity import MAX_PIXEL_DIFF, diffusers_scheduler  # noqa: E402

PROMPT = "a red apple on a table"
NEGATIVE = "blurry, dark"
GUIDANCE = 4.0
FP32 = {"weights": "fp32", "text_encoder_weights": "fp32"}
CONTEXTS = ("cond", "uncond")


def _noise(width: int, height: int) -> np.ndarray:
    return np.random.default_rng(5).standard_normal((1, 16, height // 8, width // 8), dtype=np.float32)


def _reference_config(spec):
    """diffusers' config of the same mode and values (TaylorSeer's factors in float32, as the engine's)."""
    from diffusers import TaylorSeerCacheConfig

    return TaylorSeerCacheConfig(**spec.options, taylor_factors_dtype=torch.float32)


def _diffusers_run(noise, width, height, steps, config):
    """QwenImagePipeline's image with ``config`` enabled on its transformer, and which calls ran the last block
    ("computed", else "skipped"), per context in call order: a pre-hook on the last block's attention fires only
    when the hook lets that block run (First Block Cache and MagCache skip it, TaylorSeer-Lite's inactive
    blocks return zeros without running)."""
    from diffusers import QwenImagePipeline

    pipe = tiny.build("qwen-image")
    pipe.scheduler = diffusers_scheduler(registry.get("qwen-image").scheduler)
    pipe.transformer.enable_cache(config)
    calls: list[str] = []
    pipe.transformer.register_forward_pre_hook(lambda *_: calls.append("skipped"))
    last = pipe.transformer.transformer_blocks[-1].attn

    def ran(*_):
        calls[-1] = "computed"

    last.register_forward_pre_hook(ran)
    packed = QwenImagePipeline._pack_latents(torch.from_numpy(noise), 1, 16, height // 8, width // 8)
    with torch.no_grad():
        image = pipe(
            PROMPT,
            negative_prompt=NEGATIVE,
            true_cfg_scale=GUIDANCE,
            num_inference_steps=steps,
            width=width,
            height=height,
            latents=packed,
            output_type="np",
        ).images[0]
    per_context = {name: calls[i :: len(CONTEXTS)] for i, name in enumerate(CONTEXTS)}
    return (image * 255).round().astype(np.uint8), per_context


def _per_context(verdicts: list[str]) -> dict[str, list[str]]:
    """The engine's per-step verdicts (``computed``, or ``computed/cached`` where the contexts differ) per context."""
    split = [v.split("/") if "/" in v else [v] * len(CONTEXTS) for v in verdicts]
    return {name: ["computed" if s[i] == "computed" else "skipped" for s in split] for i, name in enumerate(CONTEXTS)}


def _check_against_diffusers(folder, text, width=64, height=64, steps=8):
    pipe = engine.load_pipeline(folder, threads=1)
    noise = _noise(width, height)
    spec = step_cache.parse(text).resolved(steps)
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, guidance=GUIDANCE, width=width, height=height)
    result = pipe.generate(**common, seed=0, latents=noise, cache=spec)
    expected, reference = _diffusers_run(noise, width, height, steps, _reference_config(spec))
    ours = [s["cache"] for s in result.profile["steps"]]
    assert _per_context(ours) == reference  # the same calls computed, context by context
    assert all(len(v) == steps for v in reference.values())  # each context counted its own steps
    assert all(v.count("computed") >= 3 and "skipped" in v for v in reference.values())
    diff = np.abs(result.image.astype(int) - expected.astype(int)).max()
    assert diff <= MAX_PIXEL_DIFF, f"max pixel difference {diff}/255"
    assert expected.std() > 5
    assert result.parameters["cache"] == spec.label()
    assert result.parameters["cache_computed_steps"] == f"{ours.count('computed')} of {steps}"
    return ours


@pytest.mark.slow
@pytest.mark.parametrize(
    "text",
    [
        "taylorseer:use_lite_mode=true,cache_interval=2,disable_cache_before_step=2",
        "taylorseer:use_lite_mode=true,cache_interval=3,max_order=2",  # second-order factors
    ],
)
def test_taylorseer_lite_matches_diffusers_hook_per_cfg_context(exported_tiny, text):
    ours = _check_against_diffusers(exported_tiny("qwen-image", **FP32), text)
    spec = step_cache.parse(text)
    # a fixed schedule, the same in both contexts: what the plan announced is what ran
    assert ours == ["computed" if c else "predicted" for c in spec.schedule(8)]
