"""What image-to-image and inpainting need from an export: every family's VAE encoder, and ``tiny:sd15-inpaint``
(StableDiffusionInpaintPipeline, a 9-channel UNet) exported, fused and validated.

References are the PyTorch modules the exports came from (``exporters.build_tiny`` is deterministic) and the
diffusers StableDiffusionInpaintPipeline itself; ONNX against PyTorch within ATOL = 1e-4 (as tests/test_export.py;
the tiny graphs measure ~1e-6).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from registry import manifest as manifest_io

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("diffusers")

import exporters  # noqa: E402
from engine import images  # noqa: E402

ATOL = 1e-4
# Every tiny family, listed here on purpose: a new one must be added (and so checked for its VAE encoder).
FAMILIES = ["sd15", "sdxl", "lcm", "sd3", "flux-schnell", "flux-dev", "sd15-inpaint", "qwen-image", "hidream-i1"]
# tiny sources with no VAE encoder of their own: the reason, so a new family is never left out silently
NO_VAE_ENCODER = {
    "deepfloyd-if": "a pixel-space cascade: no VAE",
    "hidream-i1-dev": "HiDream-I1 Full's graphs with another scheduler",
    "hidream-i1-fast": "HiDream-I1 Full's graphs with another scheduler",
}
# the export the other tests of a family share (Qwen-Image's and HiDream's default formats are int4/int8; their
# parity tests export fp32)
FP32 = {"weights": "fp32", "text_encoder_weights": "fp32"}
EXPORT_KWARGS = {"qwen-image": FP32, "hidream-i1": FP32}


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def max_diff(got: np.ndarray, expected) -> float:
    expected = expected.detach().numpy() if isinstance(expected, torch.Tensor) else expected
    assert got.shape == expected.shape
    return float(np.abs(got - expected).max())


def test_the_list_is_every_tiny_family():
    assert sorted([*FAMILIES, *NO_VAE_ENCODER]) == sorted(exporters.TINY_SOURCES)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_export_has_the_vae_encoder(family, exported_tiny):
    """vae_encoder/model.onnx: `sample` (B, 3, H, W) in [-1, 1] → `latent_parameters` (B, 2 x latent channels,
    H/f, W/f), DiagonalGaussianDistribution's parameters (mean, then log-variance), validated at export and
    equal to PyTorch's ``vae.encode(x).latent_dist.parameters`` here on a non-square image."""
    folder = exported_tiny(family, **EXPORT_KWARGS.get(family, {}))
    manifest = manifest_io.read(folder)
    entry = manifest.components["vae_encoder"]
    latent_channels = manifest.config["latent_channels"]
    assert entry["path"] == "vae_encoder/model.onnx" and (folder / "vae_encoder" / "config.json").is_file()
    assert list(entry["inputs"]) == ["sample"] and list(entry["outputs"]) == ["latent_parameters"]
    assert entry["outputs"]["latent_parameters"]["shape"][1] == 2 * latent_channels
    assert entry["validation"]["max_abs_diff"] <= entry["validation"]["tolerance"]

    vae = exporters.build_tiny(family).vae
    factor = manifest.config["vae_scale_factor"]
    image = images.preprocess_image(_picture(50, 30), vae_scale_factor=factor)
    with torch.no_grad():
        if family == "qwen-image":  # a causal 3-D VAE: one frame in, the frame axis dropped from its parameters
            expected = vae.encode(torch.from_numpy(image).unsqueeze(2)).latent_dist.parameters[:, :, 0]
        else:
            expected = vae.encode(torch.from_numpy(image)).latent_dist.parameters
    got = session(folder / "vae_encoder" / "model.onnx").run(["latent_parameters"], {"sample": image})[0]
    assert got.shape == (1, 2 * latent_channels, 30 // factor, 50 // factor)
    assert max_diff(got, expected) <= ATOL


def _picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 / width, y * 255 / height, 128 + rng.normal(0, 40, x.shape)], axis=-1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def _mask(width: int, height: int) -> Image.Image:
    mask = np.zeros((height, width, 3), np.uint8)
    mask[height // 4 : 3 * height // 4, width // 3 :] = 255  # repaint a block on the right
    return Image.fromarray(mask, "RGB")


@pytest.fixture(scope="module")
def inpaint(exported_tiny):
    return exported_tiny("sd15-inpaint"), exporters.build_tiny("sd15-inpaint")


@pytest.mark.slow
def test_inpaint_export_is_validated_with_a_9_channel_unet(inpaint, exported_tiny):
    folder, pipe = inpaint
    data = manifest_io.read(folder).data
    assert data["family"] == "sd15" and data["source"] == "tiny:sd15-inpaint" and data["precision"] == "fp32"
    config = data["config"]
    assert config["pipeline_class"] == "StableDiffusionInpaintPipeline"
    assert config["in_channels"] == 9 == pipe.unet.config.in_channels
    assert config["latent_channels"] == 4 and config["denoiser"] == "unet"
    unet = data["components"]["unet"]
    assert unet["inputs"]["sample"]["shape"] == ["batch_size", 9, "height", "width"]
    assert [s["sample"][1] for s in unet["validation"]["shapes"]] == [9, 9]
    assert unet["validation"]["max_abs_diff"] <= unet["validation"]["tolerance"]
    # the default --fuse rewrote its attention exactly as it does SD 1.5's (same blocks, another conv_in)
    fusion = unet["fusion"]
    assert fusion["multi_head_attention"] > 0
    assert fusion == manifest_io.read(exported_tiny("sd15")).components["unet"]["fusion"]
    assert set(data["components"]) == {"text_encoder", "unet", "vae_encoder", "vae_decoder"}


@pytest.mark.slow
def test_inpaint_unet_reproduces_the_diffusers_pipelines_first_step(inpaint):
    """StableDiffusionInpaintPipeline's first UNet call, recorded with a hook, rebuilt from engine.images and
    the exported VAE encoder: its 9-channel input (latents, mask at latent size, scaled masked-image latents
    sampled with the pipeline's generator) and then the exported UNet's output on it."""
    folder, pipe = inpaint
    width, height = 72, 40  # asked of an image 77x53 and a mask 90x70: both resized
    factor = pipe.vae_scale_factor
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, 4, height // factor, width // factor), dtype=np.float32)
    image, mask = _picture(77, 53), _mask(90, 70)

    calls = []
    hook = pipe.unet.register_forward_hook(
        lambda _m, args, kwargs, out: calls.append((args, kwargs, out[0])), with_kwargs=True
    )
    try:
        pipe(
            "a red apple",
            image=image,
            mask_image=mask,
            height=height,
            width=width,
            num_inference_steps=1,
            guidance_scale=1.0,  # no CFG batch
            latents=torch.from_numpy(latents),
            generator=torch.Generator().manual_seed(5),
            output_type="latent",
        )
    finally:
        hook.remove()
    (args, kwargs, expected_out) = calls[0]
    expected_in = args[0].numpy()

    # what the engine will do, with its own numbers: preprocess, mask, encode the masked image, sample
    init = images.preprocess_image(image, width, height, vae_scale_factor=factor)
    mask_full = images.preprocess_mask(mask, width, height, vae_scale_factor=factor)
    parameters = session(folder / "vae_encoder" / "model.onnx").run(
        ["latent_parameters"], {"sample": images.masked_image(init, mask_full)}
    )[0]
    # latents were given, so the generator's first draw is the masked image's latent sample
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5)).numpy()
    masked_latents = pipe.vae.config.scaling_factor * images.sample_latent_distribution(parameters, noise)
    mask_latent = images.mask_to_latents(mask_full, height // factor, width // factor)
    assert 0 < mask_latent.mean() < 1
    unet_in = np.concatenate([latents * pipe.scheduler.init_noise_sigma, mask_latent, masked_latents], axis=1)
    assert max_diff(unet_in[:, :5], expected_in[:, :5]) == 0.0
    assert max_diff(unet_in, expected_in) <= ATOL

    feeds = {
        "sample": unet_in.astype(np.float32),
        "timestep": np.array(float(args[1]), dtype=np.float32),
        "encoder_hidden_states": kwargs["encoder_hidden_states"].numpy(),
    }
    got = session(folder / "unet" / "model.onnx").run(["out_sample"], feeds)[0]
    assert max_diff(got, expected_out) <= ATOL


def test_calibrating_an_inpainting_vae_is_refused_with_the_fix(tmp_path):
    # the int8 VAE is calibrated by text-to-image sampling (the int8 and int4 UNets need none)
    with pytest.raises(exporters.ExportError) as info:
        exporters.export("tiny:sd15-inpaint", out=tmp_path / "q", vae_weights="int8", progress=None)
    message = str(info.value)
    assert "9-channel UNet" in message and message.endswith("export with --vae-weights fp32") and "\n" not in message
    assert not (tmp_path / "q").exists()


def test_an_inpainting_checkpoint_is_not_tied_to_a_text_to_image_entry(tmp_path):
    with pytest.raises(exporters.ExportError) as info:
        exporters.export("tiny:sd15-inpaint", out=tmp_path / "m", model_id="sd15", progress=None)
    message = str(info.value)
    assert "--model sd15 is a text-to-image model" in message and "without --model" in message
    assert not (tmp_path / "m").exists()
