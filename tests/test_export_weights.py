"""The exporter's graph rewrites: the CPU attention fusion (default for UNets) and ``--weights int8|int8-static|int4``.

Evidence is against the independent reference, the diffusers pipeline in PyTorch on the same tiny weights:
the fused fp32 graph must keep the engine within the fp32 parity bound (the parity tests in
test_engine_parity.py run on it, as it is the default), and a quantized export must stay close to fp32
diffusers by PSNR of the final image. The bounds are stated below with what was measured.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import engine  # noqa: E402
import exporters  # noqa: E402
from exporters import main as export_main  # noqa: E402
from exporters import tiny  # noqa: E402
from tests.test_engine_parity import MAX_PIXEL_DIFF, engine_image, reference_image  # noqa: E402

# PSNR of the engine's image on a quantized export against diffusers' fp32 image (tiny random models,
# 64x64, 4 steps). Measured: int8 sd15 (weight-only: int8 convolutions, 8-bit MatMulNBits) 57.2 dB, the same
# against the fp32 export's image (which is diffusers' to the pixel); int4 sd15 52.8 dB (fp32: identical).
# int8-static (QDQ convolutions calibrated on the sampling trajectory, dynamic int8 MatMuls): measured sd15
# 35.8 dB (sdxl 34.4 dB); the full-size SD 1.5 gives ~40 dB against fp32 (docs/benchmarks.md).
MIN_PSNR_DB = {"int8": 45.0, "int8-static": 28.0, "int4": 40.0}
# the int8 UNet against PyTorch's fp32 UNet on seeded inputs: measured 39.2 dB (tiny sd15); the export's own
# floor is 20 dB (exporters/weights.py), and full-size SD 1.5 validated at 28.6 dB on its reduced-depth build
MIN_UNET_SNR_DB = 32.0
# int8 VAE decoder alone (fp32 UNet): measured 47.4 dB on tiny sd15; the full-size SD 1.5 decoder gives
# 33.6-37.6 dB (docs/vae-modes.md)
MIN_PSNR_DB_VAE_INT8 = 35.0
# SD 3's int8 decoder, calibrated on its encoder's latents of synthetic images (no PyTorch sampling): measured
# 36.1 dB on tiny sd3 (3 steps, 64x64)
MIN_PSNR_DB_VAE_INT8_SD3 = 30.0


def op_types(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.slow
def test_unet_export_is_fused_for_the_cpu_by_default(exported_tiny):
    folder = exported_tiny("sd15")
    entry = json.loads((folder / "stepwise.json").read_text())["components"]["unet"]
    ops = op_types(folder / "unet" / "model.onnx")
    assert "MultiHeadAttention" in ops and "Softmax" not in ops  # no attention left as MatMul-Softmax-MatMul
    assert entry["fusion"]["multi_head_attention"] > 0
    assert entry["validation"]["max_abs_diff"] <= entry["validation"]["tolerance"]  # fp32-exact against torch


@pytest.mark.slow
def test_no_fuse_keeps_standard_onnx_ops(exported_tiny):
    folder = exported_tiny("sd15", fuse=False)
    ops = op_types(folder / "unet" / "model.onnx")
    assert "Softmax" in ops and "MultiHeadAttention" not in ops
    assert "fusion" not in json.loads((folder / "stepwise.json").read_text())["components"]["unet"]


@pytest.mark.slow
def test_fused_and_plain_graphs_give_the_same_image(exported_tiny):
    fused, _ = engine_image(exported_tiny("sd15"), "sd15", 3, 7.5, 64, 64, seed=1)
    plain, _ = engine_image(exported_tiny("sd15", fuse=False), "sd15", 3, 7.5, 64, 64, seed=1)
    assert np.abs(fused.astype(int) - plain.astype(int)).max() <= MAX_PIXEL_DIFF


def unet_bytes(folder) -> int:
    return sum(f.stat().st_size for f in (folder / "unet").iterdir())


@pytest.mark.slow
def test_int8_static_unet_stays_close_to_diffusers_fp32(exported_tiny):
    folder = exported_tiny("sd15", weights="int8-static")
    manifest = json.loads((folder / "stepwise.json").read_text())
    entry = manifest["components"]["unet"]
    assert manifest["precision"] == "int8-static" and entry["quantization"]["weights"] == "int8-static"
    # calibrated on the UNet calls of the sampling (2 prompts x 4 steps, PNDM's 5 calls each), then measured on them
    calls = 2 * 5
    assert entry["quantization"]["conv"] == (
        f"static QDQ int8 per channel, MinMax over {calls} calibration inputs; fp32: /conv_in/Conv, /conv_out/Conv"
    )
    assert entry["validation"]["snr_inputs"] == f"{calls} calibration inputs"
    assert entry["validation"]["snr_db"] >= export_main.MIN_SNR_DB["int8-static"]
    assert {"MatMulInteger", "QuantizeLinear"} <= op_types(folder / "unet" / "model.onnx")
    assert unet_bytes(folder) < 0.8 * unet_bytes(exported_tiny("sd15"))

    image, latents = engine_image(folder, "sd15", 4, 7.5, 64, 64, seed=1)
    expected = reference_image("sd15", "sd15", 4, 7.5, 64, 64, latents)
    assert expected.std() > 5
    assert psnr(image, expected) >= MIN_PSNR_DB["int8-static"]
    # it samples a UNet pipeline in memory: the transformers (always streamed) are refused before loading
    with pytest.raises(exporters.ExportError, match=r"^--weights int8-static calibrates a UNet .* --weights int8$"):
        exporters.export("tiny:sd3", out=folder.parent / "sd3-static", weights="int8-static", progress=None)


@pytest.mark.slow
def test_int4_unet_in_memory_stays_close_to_diffusers_fp32(exported_tiny):
    folder = exported_tiny("sd15", weights="int4")
    manifest = json.loads((folder / "stepwise.json").read_text())
    entry = manifest["components"]["unet"]
    assert manifest["precision"] == "int4" and entry["quantization"]["weights"] == "int4"
    assert "MatMulNBits" in op_types(folder / "unet" / "model.onnx")
    assert unet_bytes(folder) < 0.8 * unet_bytes(exported_tiny("sd15"))
    assert entry["validation"]["snr_db"] >= export_main.MIN_SNR_DB["int4"]

    image, latents = engine_image(folder, "sd15", 4, 7.5, 64, 64, seed=1)
    expected = reference_image("sd15", "sd15", 4, 7.5, 64, 64, latents)
    assert expected.std() > 5
    assert psnr(image, expected) >= MIN_PSNR_DB["int4"]


@pytest.mark.slow
def test_int8_unet_is_weight_only_and_stays_close_to_pytorch_and_fp32(exported_tiny):
    """--weights int8 of a tiny pipeline in memory goes through the streaming writer, as folder checkpoints do:
    int8 convolutions (DequantizeLinear, the latent-side ones fp32), 8-bit MatMulNBits Linears."""
    from exporters import tiny

    folder = exported_tiny("sd15", weights="int8")
    manifest = json.loads((folder / "stepwise.json").read_text())
    entry = manifest["components"]["unet"]
    assert manifest["precision"] == "int8" and entry["weights"]["format"] == "int8"
    assert "streamed" in entry["exporter"] and entry["weights"]["int8_convs"] > 0
    graph = onnx.load(str(folder / "unet" / "model.onnx"), load_external_data=False).graph
    fp32_convs = {n.input[1] for n in graph.node if n.op_type == "Conv" and not n.input[1].endswith(".dq")}
    assert fp32_convs == {"module.conv_in.weight", "module.conv_out.weight"}  # 4 latent channels: kept fp32
    assert {"MatMulNBits", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    # (no size check here: the tiny UNet's 32-wide Linears fill a 128-value block a quarter, and every tensor
    # is page-aligned in the data file; the full-size SD 1.5 file is in docs/benchmarks.md)
    int8 = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8) == entry["weights"]["int8_convs"] == 45  # 47 convolutions, conv_in and conv_out fp32
    assert entry["validation"]["snr_db"] >= entry["validation"]["min_snr_db"] == 20.0  # measured at export

    # the graph against PyTorch's fp32 UNet of the same weights, on seeded inputs
    unet = tiny.build("sd15").unet
    rng = np.random.default_rng(3)
    sample = rng.standard_normal((2, 4, 16, 24), dtype=np.float32)
    states = rng.standard_normal((2, 77, unet.config.cross_attention_dim), dtype=np.float32)
    with torch.no_grad():
        expected = unet(torch.from_numpy(sample), 500, torch.from_numpy(states)).sample.numpy()
    feeds = {"sample": sample, "timestep": np.array(500.0, np.float32), "encoder_hidden_states": states}
    import onnxruntime

    got = onnxruntime.InferenceSession(str(folder / "unet" / "model.onnx")).run(None, feeds)[0]
    snr = 10 * np.log10(np.mean(expected**2) / np.mean((got - expected) ** 2))
    assert snr >= MIN_UNET_SNR_DB, f"{snr:.1f} dB"

    image, latents = engine_image(folder, "sd15", 4, 7.5, 64, 64, seed=1)
    expected = reference_image("sd15", "sd15", 4, 7.5, 64, 64, latents)
    fp32_image, _ = engine_image(exported_tiny("sd15"), "sd15", 4, 7.5, 64, 64, seed=1)
    assert expected.std() > 5
    assert psnr(image, expected) >= MIN_PSNR_DB["int8"]
    assert psnr(image, fp32_image) >= MIN_PSNR_DB["int8"]


def _node_ops_in_run_order(session, feeds) -> list[str]:
    """The op type of every node the session ran, in the order it ran them (ONNX Runtime's profile)."""
    session.run(None, feeds)
    events = json.loads(open(session.end_profiling()).read())
    return [e["args"]["op_name"] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]


@pytest.mark.slow
def test_int8_convolution_weights_are_dequantized_one_at_a_time(exported_tiny, tmp_path, monkeypatch):
    """The engine's sessions (the plain graph, the graph cache's first load that writes the optimised graph,
    and the load from it) run each DequantizeLinear of an int8 UNet right before its Conv, so one convolution
    weight at a time is widened to fp32: the exporter gates each one's scales on its Conv's input, so no
    execution order can run it early. Ungated, the order decided it, and on IF-I-XL's UNet the default order
    kept 32 widened weights alive (9.0 GB for 4.1 GB of int8; docs/benchmarks.md). The criterion: no two
    DequantizeLinear run back to back; the control, the same graph with the gates taken out, fails it."""
    import onnxruntime

    from engine import session as session_mod

    folder = shutil.copytree(exported_tiny("sd15", weights="int8"), tmp_path / "sd15-int8")
    path = folder / "unet" / "model.onnx"
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((2, 4, 16, 24), dtype=np.float32),
        "timestep": np.array(500.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32),
    }
    engine_options = session_mod.session_options

    def profiled(threads=None):
        options = engine_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(tmp_path / "profile")
        return options

    def back_to_back(ops) -> int:
        return sum(a == b == "DequantizeLinear" for a, b in zip(ops, ops[1:], strict=False))

    monkeypatch.setattr(session_mod, "session_options", profiled)
    monkeypatch.setenv("STEPWISE_GRAPH_CACHE", "0")
    plain = _node_ops_in_run_order(session_mod.Graph(path).session, feeds)
    assert plain.count("DequantizeLinear") == 45 and back_to_back(plain) == 0
    monkeypatch.setenv("STEPWISE_GRAPH_CACHE", "1")
    for load in ("writes the cache entry", "reads it"):
        ops = _node_ops_in_run_order(session_mod.Graph(path).session, feeds)
        assert ops.count("DequantizeLinear") == 45 and back_to_back(ops) == 0, load
    assert session_mod.cache_entry(path).is_dir()

    # the control: each DequantizeLinear reading its scales directly, in node-index order
    model = onnx.load(str(path), load_external_data=False)
    producers = {out: n for n in model.graph.node for out in n.output}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear":
            gated = producers[n.input[1]]
            assert gated.op_type == "Mul" and producers[gated.input[1]].op_type == "Sign"
            n.input[1] = gated.input[0]
    ungated = path.with_name("ungated.onnx")  # beside its data file
    onnx.save(model, str(ungated))
    options = profiled()
    options.execution_order = onnxruntime.ExecutionOrder.PRIORITY_BASED
    control = onnxruntime.InferenceSession(str(ungated), options, providers=["CPUExecutionProvider"])
    assert back_to_back(_node_ops_in_run_order(control, feeds)) > 20


def assert_int8_vae_decoder(folder) -> None:
    """The manifest says the decoder alone is int8, its graph is quantized, the image-side convs stay fp32, and
    its validation against PyTorch passed the floor."""
    manifest = json.loads((folder / "stepwise.json").read_text())
    entry = manifest["components"]["vae_decoder"]
    assert manifest["vae_precision"] == "int8" and manifest["precision"] == "fp32"
    assert "QuantizeLinear" in op_types(folder / "vae_decoder" / "model.onnx")
    assert "conv_out" in entry["quantization"]["conv"]
    assert entry["validation"]["snr_db"] >= export_main.MIN_SNR_DB["int8"]


@pytest.mark.slow
def test_int8_vae_decoder_stays_close_to_diffusers_fp32(exported_tiny):
    folder = exported_tiny("sd15", vae_weights="int8")
    assert_int8_vae_decoder(folder)
    image, latents = engine_image(folder, "sd15", 4, 7.5, 64, 64, seed=1)
    expected = reference_image("sd15", "sd15", 4, 7.5, 64, 64, latents)
    assert psnr(image, expected) >= MIN_PSNR_DB_VAE_INT8


@pytest.mark.slow
def test_int8_vae_decoder_of_a_transformer_pipeline_stays_close_to_diffusers_fp32(exported_tiny):
    # SD 3's transformer is streamed, never sampled in PyTorch: the decoder is calibrated on its encoder's latents
    from tests.test_engine_parity_flow import PROMPT, run_reference

    folder = exported_tiny("sd3", vae_weights="int8")
    assert_int8_vae_decoder(folder)
    pipe = engine.load_pipeline(folder, threads=1)
    noise = np.random.default_rng(5).standard_normal(pipe.family.latent_shape(64, 64), dtype=np.float32)
    ours = pipe.generate(prompt=PROMPT, steps=3, guidance=7.0, width=64, height=64, seed=0, latents=noise).image
    expected = run_reference(
        tiny.build("sd3"),
        torch.from_numpy(noise),
        num_inference_steps=3,
        guidance_scale=7.0,
        width=64,
        height=64,
        max_sequence_length=256,
    )
    assert psnr(ours, expected) >= MIN_PSNR_DB_VAE_INT8_SD3


def test_int8_vae_is_refused_for_a_vae_it_cannot_calibrate(tmp_path):
    with pytest.raises(exporters.ExportError, match="AutoencoderKLQwenImage: export with --vae-weights fp32"):
        exporters.export("tiny:qwen-image", out=tmp_path / "x", vae_weights="int8", progress=None)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_int4_transformer(exported_tiny):
    from diffusers import FluxPipeline

    from tests.test_engine_parity_flow import PROMPT, run_reference

    folder = exported_tiny("flux-schnell", weights="int4")
    assert "MatMulNBits" in op_types(folder / "transformer" / "model.onnx")
    pipe = engine.load_pipeline(folder, threads=1)
    noise = np.random.default_rng(5).standard_normal(pipe.family.latent_shape(64, 64), dtype=np.float32)
    ours = pipe.generate(prompt=PROMPT, steps=2, guidance=0.0, width=64, height=64, seed=0, latents=noise).image
    b, c, h, w = noise.shape
    packed = FluxPipeline._pack_latents(torch.from_numpy(noise), b, c, h, w)
    expected = run_reference(
        exporters.build_tiny("flux-schnell"),
        packed,
        num_inference_steps=2,
        guidance_scale=0.0,
        width=64,
        height=64,
        max_sequence_length=256,
    )
    assert expected.std() > 5
    assert psnr(ours, expected) >= MIN_PSNR_DB["int4"]


@pytest.mark.slow
def test_a_quantized_graph_below_the_floor_fails_the_export_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(export_main.MIN_SNR_DB, "int4", 200.0)  # no quantized graph reaches 200 dB
    out = tmp_path / "model"
    with pytest.raises(exporters.ExportError, match="below 200 dB.*--weights fp32"):
        exporters.export("tiny:sd15", out=out, weights="int4", fuse=False, progress=None)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir()]  # no temporary folder left either


def test_unknown_weights_mode_is_refused():
    with pytest.raises(exporters.ExportError, match="fp32, int8, int8-static, int4"):
        exporters.export("tiny:sd15", weights="fp16", progress=None)


@pytest.mark.slow
def test_cli_export_weights_and_the_plan_names_them(exported_tiny, tmp_path):
    from tests.test_cli_export import stepwise

    bad = stepwise(tmp_path, "export", "tiny:sd15", "--weights", "fp16")
    assert bad.returncode == 2 and "fp16" in bad.stderr and "Traceback" not in bad.stderr
    folder = shutil.copytree(exported_tiny("sd15", weights="int8"), tmp_path / "sd15-int8")
    gen = stepwise(
        tmp_path, "generate", "a red apple", "--model", str(folder), "--steps", "2", "--force", "--out", "x.png"
    )
    assert gen.returncode == 0, gen.stderr
    assert "(int8 weights)" in gen.stdout + gen.stderr
