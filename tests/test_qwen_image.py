"""Qwen-Image end to end on the tiny pipeline: the engine's image against diffusers' QwenImagePipeline from the
same initial latents (square and non-square, the default " " negative and a real one, and without CFG), and the
4-bit export's image against the fp32 one's."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

import engine  # noqa: E402
import registry  # noqa: E402
from exporters import tiny  # noqa: E402
from registry import manifest as manifest_io  # noqa: E402
from tests.test_engine_parity import MAX_PIXEL_DIFF, diffusers_scheduler  # noqa: E402

PROMPT = "a red apple on a table"
FP32 = {"weights": "fp32", "text_encoder_weights": "fp32"}
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


def diffusers_image(width, height, steps, guidance, negative, latents):
    """QwenImagePipeline's image: true CFG needs a negative prompt, " " when none is said (as the engine does)."""
    from diffusers import QwenImagePipeline

    pipe = tiny.build("qwen-image")
    pipe.scheduler = diffusers_scheduler(registry.get("qwen-image").scheduler)
    packed = QwenImagePipeline._pack_latents(torch.from_numpy(latents), 1, 16, height // 8, width // 8)
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
