"""The UNet families (SD 1.5, SDXL) streamed: a folder checkpoint's UNet and CLIP encoders traced on the meta
device, their weights written one tensor at a time (exporters/streaming.py), validated whole or on the reduced-
depth UNet (exporters/reduced.unet_plan).

References: diffusers' pipelines loaded from the same bf16 folder (the images, within 2/255), PyTorch's UNet
(each export's validation), a corrupted checkpoint (which the reduced-depth validation must refuse).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

import exporters  # noqa: E402
from exporters import streaming, tiny  # noqa: E402

from .test_engine_parity import MAX_PIXEL_DIFF, diffusers_image, engine_image  # noqa: E402
from .test_streaming import write_wrong  # noqa: E402


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    """``bf16_folder(name)``: tiny:<name> saved as the hub ships checkpoints: bf16 safetensors."""
    made = {}

    def get(name: str):
        if name not in made:
            folder = tmp_path_factory.mktemp(f"{name}-bf16") / name
            pipe = tiny.build(name)
            pipe.to(torch.bfloat16)
            pipe.save_pretrained(folder, safe_serialization=True)
            made[name] = folder
        return made[name]

    return get


@pytest.fixture(scope="module")
def streamed_export(bf16_folder, tmp_path_factory):
    """``streamed_export(name)``: the export of ``bf16_folder(name)``."""
    made = {}

    def get(name: str):
        if name not in made:
            out = tmp_path_factory.mktemp(name) / "export"
            made[name] = exporters.export(str(bf16_folder(name)), out=out, progress=None)
        return made[name]

    return get


@pytest.mark.slow
# SDXL: both CLIP encoders and the text_time UNet (SD 1.5's streamed UNet is compared with PyTorch in
# tests/test_export_hub.py, its engine parity on the pipeline-loading export in tests/test_engine_parity.py)
@pytest.mark.parametrize("name, model_id, guidance", [("sdxl", "sdxl", 5.0)])
def test_folder_export_streams_the_unet_and_matches_diffusers(bf16_folder, streamed_export, name, model_id, guidance):
    folder = bf16_folder(name)
    out = streamed_export(name)
    manifest = json.loads((out / "stepwise.json").read_text())
    encoders = [n for n in manifest["components"] if n.startswith("text_encoder")]
    for component in ("unet", *encoders):
        assert "streamed" in manifest["components"][component]["exporter"]
    assert "streamed" not in manifest["components"]["vae_decoder"].get("exporter", "")
    assert manifest["components"]["unet"]["fusion"]["multi_head_attention"] > 0
    assert manifest["components"]["unet"]["validation"]["compared"] == "whole"

    width, height, steps = 64, 48, 3
    ours, latents = engine_image(out, model_id, steps, guidance, width, height, seed=0)
    reference = diffusers.DiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    expected = diffusers_image(reference, model_id, steps, guidance, width, height, latents * 1.0)
    assert ours.shape == expected.shape == (height, width, 3)
    diff = np.abs(ours.astype(int) - expected.astype(int)).max()
    assert diff <= MAX_PIXEL_DIFF, f"max pixel difference {diff}/255"
    assert expected.std() > 5


@pytest.mark.slow
def test_reduced_depth_unet_validation_catches_a_wrong_up_block(bf16_folder, streamed_export, monkeypatch):
    # a writer bug in the last resnet of an up block (checkpoint index 2, the reduced UNet's index 1) is caught:
    # the reduced build must read that layer from index 2, or it would compare a layer the bug never touched
    from exporters import components, reduced, sources, validate

    folder = bf16_folder("sdxl")
    graph = streamed_export("sdxl") / "unet" / "model.onnx"
    unet = components.make(sources.load_folder(folder, streamed=True), "unet")
    checkpoint = streaming.SafetensorsWeights(folder / "unet")
    monkeypatch.setattr(streaming, "FULL_VALIDATION_BYTES", 0)
    result = reduced.check(unet, checkpoint, graph, opset=17, fmt="fp32", tolerances={})
    assert result["compared"].startswith("reduced depth: UNet of 2/2 layers per block")
    assert result["max_abs_diff"] < 1e-4

    write_wrong(monkeypatch, "up_blocks.0.resnets.2.conv1.")
    with pytest.raises(validate.ValidationFailed):
        reduced.check(unet, checkpoint, graph, opset=17, fmt="fp32", tolerances={})


@pytest.mark.slow
def test_int8_unet_streams_and_the_int8_vae_loads_the_pipeline(bf16_folder, tmp_path, monkeypatch):
    # weight-only int8 needs no calibration: the folder's UNet is written tensor by tensor (int4 takes the same
    # writer with 4-bit Linears and fp32 convolutions), validated against PyTorch
    folder = bf16_folder("sd15")
    out = exporters.export(str(folder), out=tmp_path / "int8", weights="int8", progress=None)
    unet = json.loads((out / "stepwise.json").read_text())["components"]["unet"]
    assert "streamed" in unet["exporter"]
    assert unet["weights"]["format"] == "int8" and unet["weights"]["linear_weights"]["int8"] > 0
    assert unet["weights"]["int8_convs"] > 0
    assert unet["validation"]["snr_db"] >= unet["validation"]["min_snr_db"]
    # the VAE decoder's static int8 samples the whole pipeline to calibrate its convolutions: that path loads
    # the checkpoint, as do a fused UNet or LoRA and the tiny pipelines (built in memory)
    assert streaming.streamed_source("sd15", "folder", parts=False, vae_weights="fp32")
    assert not streaming.streamed_source("sd15", "hub", parts=False, vae_weights="int8")
    assert not streaming.streamed_source("sdxl", "folder", parts=True, vae_weights="fp32")
    assert not streaming.streamed_source("sdxl", "tiny", parts=False, vae_weights="fp32")
    assert not streaming.streamed_source("sd15", "folder", parts=False, vae_weights="fp32", weights="int8-static")
    # and where that pipeline cannot fit (SDXL's is 14 GB in fp32), it is refused before loading
    monkeypatch.setenv("STEPWISE_AVAILABLE_MB", "10")  # the tiny pipeline's calibration needs ~35 MB by the rule
    with pytest.raises(exporters.ExportError, match=r"--vae-weights int8 calibrates .* export with --vae-weights fp32"):
        exporters.export(str(folder), out=tmp_path / "vae8", vae_weights="int8", progress=None)
    assert not (tmp_path / "vae8").exists()
    # as is the calibrated int8-static UNet (SD 1.5 needs ~17 GB), naming the weight-only int8 instead
    with pytest.raises(exporters.ExportError, match=r"--weights int8-static calibrates .* export with --weights int8 "):
        exporters.export(str(folder), out=tmp_path / "static", weights="int8-static", progress=None)
    assert not (tmp_path / "static").exists()


@pytest.mark.slow
def test_the_reduced_unet_reference_read_while_running_gives_the_fp32_numbers(bf16_folder):
    """The reduced-depth UNet that validation runs in PyTorch reads each module's weights from the checkpoint
    only for its forward (IF-I-XL's reduced build is 9.5 GB in fp32): its outputs must be the loaded build's
    bit for bit, for every UNet kind (SD 1.5, SDXL's text-time embedding, IF's stage I and II with the noise
    level as a timestep, the x4 upscaler's noise-level table), and nothing may stay loaded after."""
    from exporters import components, reduced, validate
    from exporters.deepfloyd_if import tiny as if_tiny

    stage_1, stage_2 = if_tiny.build_cascade()
    cases = [(n, tiny.build(n), streaming.SafetensorsWeights(bf16_folder(n) / "unet")) for n in ("sd15", "sdxl")]
    for name, pipe in (("if-i", stage_1), ("if-ii", stage_2), ("x4-upscaler", if_tiny.build_stage_3())):
        cases.append((name, pipe, streaming.ModuleWeights(pipe.unet)))
    for name, pipe, checkpoint in cases:
        component = components.make(pipe, "unet")
        cls = type(pipe.unet)
        config, remap, _ = reduced.unet_plan(pipe.unet)
        lazy = reduced.materialize(cls, config, checkpoint, remap, on_demand=True)
        assert all(p.is_meta for p in lazy.parameters()), name  # nothing read before it runs
        read = validate.references(component.rebuild(lazy))
        assert all(p.is_meta for p in lazy.parameters()), name  # and nothing held after
        loaded = validate.references(component.rebuild(reduced.materialize(cls, config, checkpoint, remap)))
        for (_, ours), (_, expected) in zip(read, loaded, strict=True):
            for key in expected:
                assert np.array_equal(ours[key], expected[key]), (name, key)
    # the control: the same build without the reading hooks cannot run
    bare = streaming.build(cls, config, meta_buffers=False)[0]
    with pytest.raises((RuntimeError, NotImplementedError)):
        validate.references(components.make(pipe, "unet").rebuild(bare))
