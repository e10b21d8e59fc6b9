"""Qwen-Image end to end on the tiny pipeline: the engine's image against diffusers' QwenImagePipeline from the
same initial latents (square and non-square, the default " " negative and a real one, and without CFG), the
4-bit export's image against the fp32 one's, and step caching (``--cache``) against diffusers' own hooks.

The cache's reference is the same pipeline with ``transformer.enable_cache(<the same config>)`` and true CFG on (a
negative prompt, true_cfg_scale 4): QwenImagePipeline runs the prompt in ``cache_context("cond")`` and the negative
in ``cache_context("uncond")``, and each hook keeps one state per context, so the engine keeps one cache per
context (engine/cache.py PerContext). Checked: the same calls computed in each context, the image within 2/255.
TaylorSeer's default mode is checked so too, and its final latents within 1e-4 of diffusers'. The fp32 export
carries the step-cache graphs (--cache-graphs: the split, and TaylorSeer's record and predict graphs), so one
export serves every test here."""

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
from registry import manifest as manifest_io  # noqa: E402
from tests.test_engine_parity import MAX_PIXEL_DIFF, diffusers_scheduler  # noqa: E402

PROMPT = "a red apple on a table"
FP32 = {"weights": "fp32", "text_encoder_weights": "fp32", "cache_graphs": True}
# the default formats (int4 transformer, int8 text encoder) against fp32 on the tiny model, 3 steps at 64x48:
# measured 37.4 dB (with an int4 text encoder too)
MIN_INT4_PSNR_DB = 20.0


def _latents(width: int, height: int) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((1, 16, height // 8, width // 8), dtype=np.float32)


def engine_image(folder, width, height, steps, guidance, negative, latents):
    pipe = engine.load_pipeline(folder, threads=1)
    result = pipe.generate(
        prompt=PROMPT,
        negative_prompt=negative,
        steps=steps,
        guidance=guidance,
        width=width,
        height=height,
        seed=0,
        latents=latents,
    )
    return result


def _last_attention(transformer):
    return transformer.transformer_blocks[-1].attn


def diffusers_image(
    width, height, steps, guidance, negative, latents, cache=None, calls=None, probe=_last_attention, final=None
):
    """QwenImagePipeline's image: true CFG needs a negative prompt, " " when none is said (as the engine does).
    ``cache``: a diffusers cache config enabled on the transformer; ``calls`` then gets, per transformer call,
    "computed" or "skipped": a pre-hook on ``probe(transformer)``, by default the last block's attention, fires
    only when the hook lets that block run (First Block Cache and MagCache skip it, TaylorSeer-Lite's inactive
    blocks return zeros without running; TaylorSeer's default mode runs the block and predicts its attention, so
    its probe is inside the attention). ``final``: gets the final (packed) latents."""
    from diffusers import QwenImagePipeline

    pipe = tiny.build("qwen-image")
    pipe.scheduler = diffusers_scheduler(registry.get("qwen-image").scheduler)
    if cache is not None:
        pipe.transformer.enable_cache(cache)
        pipe.transformer.register_forward_pre_hook(lambda *_: calls.append("skipped"))
        probe(pipe.transformer).register_forward_pre_hook(lambda *_: calls.__setitem__(-1, "computed"))
    packed = QwenImagePipeline._pack_latents(torch.from_numpy(latents), 1, 16, height // 8, width // 8)

    def keep(pipe, index, t, tensors):
        if final is not None:
            final[:] = [tensors["latents"].numpy().copy()]
        return tensors

    with torch.no_grad():
        image = pipe(
            PROMPT,
            negative_prompt=(negative or " ") if guidance > 1 else None,
            true_cfg_scale=guidance,
            num_inference_steps=steps,
            width=width,
            height=height,
            latents=packed,
            output_type="np",
            callback_on_step_end=keep,
        ).images[0]
    return (image * 255).round().astype(np.uint8)


CASES = [
    (64, 64, 3, 4.0, ""),  # the registry's guidance, the default negative " "
    (96, 64, 2, 4.0, "blurry, dark"),  # non-square, a negative prompt
    (64, 96, 2, 1.0, ""),  # no CFG: one transformer call a step
]


@pytest.mark.parametrize("width, height, steps, guidance, negative", CASES, ids=["square", "negative", "no-cfg"])
def test_qwen_image_matches_diffusers(exported_tiny, width, height, steps, guidance, negative):
    latents = _latents(width, height)
    result = engine_image(exported_tiny("qwen-image", **FP32), width, height, steps, guidance, negative, latents)
    expected = diffusers_image(width, height, steps, guidance, negative, latents)
    assert result.image.shape == expected.shape == (height, width, 3)
    diff = np.abs(result.image.astype(int) - expected.astype(int)).max()
    assert diff <= MAX_PIXEL_DIFF, f"max pixel difference {diff}/255"
    assert expected.std() > 5  # not a flat picture that any broken pipeline would also "match"
    if guidance > 1:
        assert result.parameters["negative_prompt"] == (negative or " ")


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


def test_int4_export_is_the_default_and_close_to_fp32(exported_tiny):
    # no formats said: int4 transformer, int8 text encoder (the export tests/test_qwen_cli.py runs too)
    folder = exported_tiny("qwen-image", model_id="qwen-image")
    data = manifest_io.read(folder, check_files=False).data
    assert data["components"]["transformer"]["weights"]["format"] == "int4"
    assert data["components"]["text_encoder"]["weights"]["format"] == "int8"
    assert data["components"]["text_encoder"]["weights"]["bf16_embeddings"] == 1
    latents = _latents(64, 48)
    fp32 = engine_image(exported_tiny("qwen-image", **FP32), 64, 48, 3, 4.0, "", latents).image
    int4 = engine_image(folder, 64, 48, 3, 4.0, "", latents).image
    psnr = _psnr(fp32, int4)
    assert psnr >= MIN_INT4_PSNR_DB, f"int4 vs fp32: {psnr:.1f} dB"
    assert psnr < 60  # the formats differ: a test that compared fp32 with itself would pass at infinity


# --- step caching against diffusers' hooks, true CFG on ------------------------------------------------------

NEGATIVE = "blurry, dark"
CONTEXTS = ("cond", "uncond")  # the order QwenImagePipeline calls them in each step


def _reference_config(spec):
    """diffusers' config of the same mode and values: TaylorSeer's factors in float32 (as the engine's), MagCache's
    ratios the ones the spec names (resolved for Qwen-Image: MagCache's published Qwen-Image calibration)."""
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    options = spec.options
    if spec.mode == "fbcache":
        return FirstBlockCacheConfig(**options)
    if spec.mode == "magcache":
        ratios = step_cache.NAMED_MAG_RATIOS[options["mag_ratios"]]
        return MagCacheConfig(**{**options, "mag_ratios": list(ratios)})
    return TaylorSeerCacheConfig(**options, taylor_factors_dtype=torch.float32)


def _per_context(verdicts: list[str]) -> dict[str, list[str]]:
    """The engine's per-step verdicts (``computed``, or ``computed/cached`` where the contexts differ) per context."""
    split = [v.split("/") if "/" in v else [v] * len(CONTEXTS) for v in verdicts]
    return {name: ["computed" if s[i] == "computed" else "skipped" for s in split] for i, name in enumerate(CONTEXTS)}


def check_cache_against_diffusers(folder, text, width=64, height=64, steps=8, probe=_last_attention, final=None):
    """``final``: gets the engine's final latents (packed as diffusers' are), then diffusers' own."""
    latents = _latents(width, height)
    spec = step_cache.parse(text).resolved(steps, "qwen-image")
    pipe = engine.load_pipeline(folder, threads=1)
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, guidance=4.0, width=width, height=height)
    result = pipe.generate(**common, seed=0, latents=latents, cache=spec)
    calls, theirs = [], []
    config = _reference_config(spec)
    expected = diffusers_image(width, height, steps, 4.0, NEGATIVE, latents, config, calls, probe, theirs)
    if final is not None:
        final += [_packed(result.latents), *theirs]
    reference = {name: calls[i :: len(CONTEXTS)] for i, name in enumerate(CONTEXTS)}
    ours = [s["cache"] for s in result.profile["steps"]]
    assert _per_context(ours) == reference  # the same calls computed, context by context
    assert all(len(v) == steps and v.count("computed") >= 3 and "skipped" in v for v in reference.values())
    diff = np.abs(result.image.astype(int) - expected.astype(int)).max()
    assert diff <= MAX_PIXEL_DIFF, f"max pixel difference {diff}/255"
    assert expected.std() > 5
    assert result.parameters["cache"] == spec.label()
    assert result.parameters["cache_computed_steps"] == f"{ours.count('computed')} of {steps}"
    schedule = spec.schedule(steps)
    if schedule is not None:  # a fixed schedule, the same in both contexts: what the plan announced ran
        assert ours == ["computed" if c else step_cache.MODES[spec.mode].label_skipped for c in schedule]
    return ours


@pytest.mark.slow
def test_taylorseer_lite_matches_diffusers_hook_per_cfg_context(exported_tiny):
    # second-order factors are checked on FLUX (tests/test_step_cache.py): the per-context states are what is new
    text = "taylorseer:use_lite_mode=true,cache_interval=2,disable_cache_before_step=2"
    assert "predicted" in check_cache_against_diffusers(exported_tiny("qwen-image", **FP32), text)


@pytest.mark.slow
def test_taylorseers_graphs_are_composed_as_the_whole_and_share_its_weights(exported_tiny):
    """The record and predict graphs (--cache-graphs): every hooked attention output recorded but the last block's
    text output (it feeds nothing the transformer returns, and the whole graph has no weight for it), the predict
    graph given them, composed against the whole at export; both read the whole graph's data file, hard-linked."""
    folder = exported_tiny("qwen-image", **FP32)
    manifest = manifest_io.read(folder)
    composed = manifest.data["cache_graphs"]["composed"]
    assert {"taylorseer record", "taylorseer predict"} <= set(composed["max_abs_diff_each"])
    assert composed["max_abs_diff"] <= composed["tolerance"]
    record, predict = (manifest.components[name] for name in step_cache.TAYLOR_GRAPHS)
    attention = [
        "transformer_blocks.0.attn.output_0",
        "transformer_blocks.0.attn.output_1",
        "transformer_blocks.1.attn.output_0",
    ]  # the tiny transformer's two blocks
    assert list(record["outputs"]) == ["out_hidden_states", *attention]
    assert list(predict["inputs"])[-3:] == attention and list(predict["outputs"]) == ["out_hidden_states"]
    assert predict["params"] < record["params"] == manifest.components["transformer"]["params"]
    whole = folder / manifest.components["transformer"]["data_path"]
    for entry in (record, predict):
        assert entry["data_shared_with"] == "transformer" and (folder / entry["data_path"]).samefile(whole)


def _packed(latents: np.ndarray) -> np.ndarray:
    """The engine's (unpacked) latents packed 2x2 as QwenImagePipeline's are."""
    from diffusers import QwenImagePipeline

    b, c, h, w = latents.shape
    return QwenImagePipeline._pack_latents(torch.from_numpy(latents), b, c, h, w).numpy()


@pytest.mark.slow
def test_taylorseer_matches_diffusers_hook_per_cfg_context(exported_tiny):
    """The default mode: every block's attention output predicted on the hook's steps, the rest of the transformer
    run on the predictions (the record and predict graphs), one TaylorSeer per CFG context, against diffusers' hook
    with float32 factors: the same calls predicted in each context, the image within 2/255, the final latents
    within 1e-4 (measured 1.4e-6). The tiny model's attention moves its image little, so the latents are what can
    fail: the uncached run's are farther (measured 4.8e-3; the lite mode's 6.8e-2)."""
    atol, final = 1e-4, []
    folder = exported_tiny("qwen-image", **FP32)
    text = "taylorseer:cache_interval=2,disable_cache_before_step=2"
    ours = check_cache_against_diffusers(folder, text, probe=lambda t: t.transformer_blocks[-1].attn.to_q, final=final)
    assert "predicted" in ours
    cached, theirs = final
    error = np.abs(cached - theirs).max()
    assert error < atol, f"final latents {error:.1e} from diffusers'"
    pipe = engine.load_pipeline(folder, threads=1)
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, steps=8, guidance=4.0, width=64, height=64)
    uncached = _packed(pipe.generate(**common, seed=0, latents=_latents(64, 64)).latents)
    assert np.abs(uncached - theirs).max() > 10 * atol


@pytest.mark.slow
def test_the_memory_estimate_counts_taylorseers_factors_per_cfg_context(exported_tiny, monkeypatch):
    """Under true CFG each context keeps its own TaylorSeer (both hold factors after a run), so the plan counts
    the factors once per context: with CFG it needs one context's factors more than without (the transformer's
    batch is 1 either way)."""
    from engine import cache as caching
    from engine import memory

    made = []
    original = caching.cached_denoiser
    monkeypatch.setattr(caching, "cached_denoiser", lambda *a, **k: made.append(original(*a, **k)) or made[-1])
    spec = step_cache.parse("taylorseer")
    pipe = engine.load_pipeline(exported_tiny("qwen-image", **FP32), threads=1, cache=spec)
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=64, seed=0, latents=_latents(64, 64))
    pipe.generate(**common, steps=5, guidance=4.0, cache=spec)
    (per_context,) = [m for m in made if isinstance(m, caching.PerContext)]
    assert [len(seer.factors) for seer in per_context.caches] == [3, 3]  # "cond" and "uncond": each its own
    assert all(f.factors for seer in per_context.caches for f in seer.factors.values())
    guided, plain = (pipe.plan_memory(64, 64, guidance=g).resident_mb for g in (4.0, 1.0))
    record = step_cache.TAYLOR_GRAPHS[0]
    one = memory.activation_mb(pipe.manifest, record, 64, 64, batch=1) - memory.activation_mb(
        pipe.manifest, record, 64, 64, batch=1, contexts=0
    )
    assert one > 0 and guided - plain == pytest.approx(one, rel=1e-6)


@pytest.mark.slow
def test_fbcache_matches_diffusers_hook_per_cfg_context(exported_tiny):
    """threshold 0.4: this tiny model's relative changes at 64x64 (0.485, 0.431, 0.379, 0.49, 0.375, 0.368,
    0.512 in "cond", within 3% of them in "uncond") sit at least 5% away from it, so rounding between ONNX
    Runtime and PyTorch cannot flip a decision, and both verdicts occur."""
    assert "cached" in check_cache_against_diffusers(exported_tiny("qwen-image", **FP32), "fbcache:threshold=0.4")


@pytest.mark.slow
def test_magcache_with_the_published_qwen_ratios_matches_diffusers_hook(exported_tiny):
    ours = check_cache_against_diffusers(exported_tiny("qwen-image", **FP32), "magcache")
    assert ours.count("cached") == 2  # MagCache4QwenImage's ratios at 8 steps: CCCC..CC


def test_the_reduced_depth_build_keeps_a_block_for_the_split():
    """A full-size transformer's graphs are validated at reduced depth (exporters/reduced.py): the build keeps the
    last block too, so the split's transformer_blocks graph (every block after the first) is not empty there
    (checked by hand: a 4-block tiny export validated at [0, 3] of 4, each split graph within 5e-7)."""
    from diffusers import QwenImageTransformer2DModel

    from exporters import reduced, split, streaming

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(
        num_layers=6, attention_head_dim=16, num_attention_heads=1, joint_attention_dim=8, axes_dims_rope=(8, 4, 4)
    )
    config, _, what = reduced.plan(model)
    assert "transformer_blocks [0, 5] of 6" in what
    _, blocks, _, *taylor = split.graphs(streaming.build(type(model), config)[0])
    assert len(blocks.parts) == 1
    # and TaylorSeer's graphs record the reduced build's attention outputs: its last block's is block 1's here
    assert list(taylor[0].outputs)[-1] == "transformer_blocks.1.attn.output_0"


@pytest.mark.slow
def test_magcache_calibration_reports_the_prompts_ratios(exported_tiny, capsys):
    """calibrate=true under true CFG: diffusers' hook measures (and prints) one list per context, the prompt's
    first; the engine reports the prompt's, as mag_ratios=[...] takes them."""
    import ast

    from diffusers import MagCacheConfig

    latents, steps = _latents(64, 64), 6
    spec = step_cache.parse("magcache:calibrate=true").resolved(steps, "qwen-image")
    pipe = engine.load_pipeline(exported_tiny("qwen-image", **FP32), threads=1)
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, guidance=4.0, width=64, height=64)
    result = pipe.generate(**common, seed=0, latents=latents, cache=spec)
    capsys.readouterr()
    diffusers_image(
        64, 64, steps, 4.0, NEGATIVE, latents, MagCacheConfig(num_inference_steps=steps, calibrate=True), []
    )
    printed = [ast.literal_eval(line) for line in capsys.readouterr().out.splitlines() if line.startswith("[1.0")]
    assert len(printed) == 2 and printed[0] != printed[1]  # one per context: which one is reported matters
    ours = step_cache.parse(f"magcache:mag_ratios={result.parameters['cache_mag_ratios']}").options["mag_ratios"]
    np.testing.assert_allclose(ours, printed[0], rtol=0, atol=1e-4)  # printed to 5 decimals; seen within 1e-5
    assert result.parameters["cache_computed_steps"] == f"{steps} of {steps}"
