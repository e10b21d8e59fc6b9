"""The streaming exporter (exporters/streaming.py, weights.py, reduced.py): SD 3 and FLUX components traced on the
meta device, their weights written one tensor at a time, block-quantized to MatMulNBits on the way.

References: ONNX Runtime's own MatMulNBits kernel for the packing, diffusers' pipelines (loaded from the same
bf16 folder) for the images, the fp32 export's image for the quantized formats' fidelity.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
ort = pytest.importorskip("onnxruntime")

import engine  # noqa: E402
import exporters  # noqa: E402
from exporters import streaming, tiny, weights  # noqa: E402

PROMPT = "a cat holding a sign that says hello"


# --- the block format against onnxruntime's kernel ---------------------------------------------------------


def _nbits_session(q, scales, bits, k, n, level):
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node(
        "MatMulNBits",
        ["x", "q", "s"],
        ["y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=weights.BLOCK,
        accuracy_level=level,
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scales, "s")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _snr_db(ref, got) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((got - ref.astype(np.float64)) ** 2)))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [256, 200])  # 200: a partial last block, zero-padded
def test_block_quantization_is_what_onnxruntime_computes(bits, k):
    rng = np.random.default_rng(bits * 1000 + k)
    n = 48
    w = rng.standard_normal((n, k), dtype=np.float32) / np.sqrt(k)
    x = rng.standard_normal((7, k), dtype=np.float32)
    q, scales = weights.quantize(w, bits)
    # accuracy level 0: fp32 arithmetic, so the kernel's result is x @ (the weight it unpacked).T exactly
    got = _nbits_session(q, scales, bits, k, n, 0).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ weights.dequantize(q, scales, bits, k).T, rtol=1e-4, atol=1e-4)
    # and the unpacked weight is the original one, to the format's precision (uniform noise of ~1/2^bits)
    floor = {4: 17.0, 8: 40.0}[bits]
    assert _snr_db(x @ w.T, got) > floor
    # accuracy level 4 (int8 activations): what the exports use
    fast = _nbits_session(q, scales, bits, k, n, weights.ACCURACY_LEVEL).run(None, {"x": x})[0]
    assert _snr_db(x @ w.T, fast) > floor - 3


def test_quantize_uses_the_whole_code_range():
    w = np.array([[0.5, -1.0, 0.25, 0.0] * 32], dtype=np.float32)  # one block of 128
    q, scales = weights.quantize(w, 4)
    values = np.stack([q & 0x0F, q >> 4], axis=-1).reshape(-1)
    assert values.min() == 0 and scales[0] == pytest.approx(1 / 8)  # -1.0 → code 0 (-8 · 1/8)
    np.testing.assert_allclose(weights.dequantize(q, scales, 4, 128), w, atol=1 / 16)


# --- a folder of bf16 shards, exported without loading the big components ------------------------------------


def write_wrong(monkeypatch, prefix: str) -> None:
    """Make the streaming writer write every checkpoint tensor whose name starts with ``prefix`` 1.5x too big:
    a writer bug, which validation must catch."""
    write = streaming.write

    def corrupt(model, plan, checkpoint, *args, **kwargs):
        class Wrong:
            def __contains__(self, name):
                return name in checkpoint

            def array(self, name):
                value = checkpoint.array(name)
                return value * 1.5 if name.startswith(prefix) else value

        return write(model, plan, Wrong(), *args, **kwargs)

    monkeypatch.setattr(streaming, "write", corrupt)


@pytest.fixture(scope="module")
def flux_bf16_folder(tmp_path_factory):
    """tiny:flux-schnell saved the way the hub ships FLUX.1: bf16 safetensors."""
    folder = tmp_path_factory.mktemp("flux-bf16") / "flux"
    pipe = tiny.build("flux-schnell")
    pipe.to(torch.bfloat16)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.slow
def test_folder_export_streams_and_matches_diffusers(flux_bf16_folder, tmp_path, monkeypatch):
    loaded = []
    original = streaming.SafetensorsWeights.array
    monkeypatch.setattr(
        streaming.SafetensorsWeights, "array", lambda self, name: loaded.append(name) or original(self, name)
    )
    out = exporters.export(str(flux_bf16_folder), out=tmp_path / "flux", progress=None)
    manifest = json.loads((out / "stepwise.json").read_text())
    for name in ("text_encoder", "text_encoder_2", "transformer"):
        assert "streamed" in manifest["components"][name]["exporter"]
    assert any(name.startswith("transformer_blocks.") for name in loaded)  # read from the shards, tensor by tensor

    pipe = engine.load_pipeline(out, threads=1)
    noise = np.random.default_rng(6).standard_normal(pipe.family.latent_shape(64, 48), dtype=np.float32)
    ours = pipe.generate(prompt=PROMPT, steps=2, guidance=0.0, width=64, height=48, seed=0, latents=noise).image
    ref = diffusers.FluxPipeline.from_pretrained(str(flux_bf16_folder), torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    b, c, h, w = noise.shape
    packed = diffusers.FluxPipeline._pack_latents(torch.from_numpy(noise), b, c, h, w)
    with torch.no_grad():
        image = ref(
            PROMPT,
            latents=packed,
            num_inference_steps=2,
            guidance_scale=0.0,
            width=64,
            height=48,
            max_sequence_length=256,
            output_type="np",
        ).images[0]
    expected = (image * 255).round().astype(np.uint8)
    assert np.abs(ours.astype(int) - expected.astype(int)).max() <= 2
    assert expected.std() > 5


@pytest.mark.slow
def test_reduced_depth_validation_compares_blocks_and_catches_a_wrong_one(flux_bf16_folder, tmp_path, monkeypatch):
    # every component validated the way a 12 B-parameter one is: on a reduced-depth build
    monkeypatch.setattr(streaming, "FULL_VALIDATION_BYTES", 0)
    out = exporters.export(str(flux_bf16_folder), out=tmp_path / "ok", progress=None)
    validation = json.loads((out / "stepwise.json").read_text())["components"]["transformer"]["validation"]
    assert validation["compared"].startswith("reduced depth: transformer_blocks [0] of 1")
    assert validation["max_abs_diff"] <= validation["tolerance"]

    # a block weight written wrong (a bug in the writer) is caught by the reduced build
    write_wrong(monkeypatch, "transformer_blocks.0.ff.")
    with pytest.raises(exporters.ExportError, match="validating transformer failed"):
        exporters.export(str(flux_bf16_folder), out=tmp_path / "bad", progress=None)
    assert not (tmp_path / "bad").exists()


# --- int8 / int4 against fp32: the final image from the same noise -------------------------------------------

# PSNR floors (dB) of the decoded image against the fp32 export's, from the same noise and prompt: each format
# once on each kind of component. Measured on the tiny random models: FLUX int4 transformer + int8 T5 ~40,
# SD3 int8 transformer + int4 T5 ~46 (each format alone: FLUX int8 56, int4 41; SD3 int8 45, int4 40).
PSNR_FLOOR = {"flux-schnell": 34.0, "sd3": 40.0}
FORMATS = {"flux-schnell": ("int4", "int8"), "sd3": ("int8", "int4")}  # (transformer, T5)


def _image(folder, family, width=64, height=48):
    pipe = engine.load_pipeline(folder, threads=1)
    noise = np.random.default_rng(7).standard_normal(pipe.family.latent_shape(width, height), dtype=np.float32)
    guidance = 0.0 if family.startswith("flux") else 5.0
    result = pipe.generate(prompt=PROMPT, steps=2, guidance=guidance, width=width, height=height, seed=0, latents=noise)
    return result.image.astype(np.float64)


def _psnr(a, b) -> float:
    mse = np.mean((a - b) ** 2)
    return float(10 * np.log10(255.0**2 / mse)) if mse else float("inf")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux-schnell", "sd3"])
def test_quantized_denoiser_and_t5_fidelity(exported_tiny, family):
    reference = _image(exported_tiny(family), family)
    den, t5_fmt = FORMATS[family]
    quantized = exported_tiny(family, weights=den, text_encoder_weights=t5_fmt)
    manifest = json.loads((quantized / "stepwise.json").read_text())
    t5 = "text_encoder_2" if family.startswith("flux") else "text_encoder_3"
    for name, fmt in (("transformer", den), (t5, t5_fmt)):
        entry = manifest["components"][name]
        assert entry["weights"]["format"] == fmt and entry["weights"]["linear_weights"][fmt] > 0
        assert entry["validation"]["snr_db"] >= entry["validation"]["min_snr_db"]
    psnr = _psnr(_image(quantized, family), reference)
    print(f"{family} {den} transformer, {t5_fmt} T5: PSNR {psnr:.1f} dB against fp32")
    assert PSNR_FLOOR[family] <= psnr < 80  # close to fp32, and not fp32 itself


def test_text_encoder_weights_refused_without_t5(tmp_path):
    with pytest.raises(exporters.ExportError, match="applies to T5-XXL"):
        exporters.export("tiny:sd15", out=tmp_path / "x", text_encoder_weights="int8", progress=None)


def test_lora_on_a_streamed_checkpoint_is_refused_before_loading(flux_bf16_folder, tmp_path):
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"not read")
    with pytest.raises(exporters.ExportError, match="fuse it into the checkpoint first"):
        exporters.export(str(flux_bf16_folder), out=tmp_path / "x", lora=str(lora), progress=None)
