"""engine/images.py against diffusers 0.39: VaeImageProcessor (as the img2img/inpaint pipelines configure it),
``diffusers.utils.load_image``, ``torch.nn.functional.interpolate`` and ``DiagonalGaussianDistribution``.

The references are diffusers/torch objects, never numbers engine/images.py produced. Tolerances:

* image and mask preprocessing: max|diff| <= 1e-6 (both sides make the same Pillow calls; measured 0.0);
* mask → latent size: exact (an index gather);
* latent sampling: |diff| <= 1e-6 * (1 + |reference|) (float32 exp in numpy vs torch; measured at most
  1.7e-7 * (1 + |reference|)).

Each family's processors are also taken from the real pipeline classes (built from the tiny pipelines'
components), so the rule "SD/SDXL/SD3: the VAE's scale factor, FLUX: twice it" is checked against diffusers,
not assumed.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine import images
from engine.errors import EngineError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.image_processor import VaeImageProcessor  # noqa: E402
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402
from diffusers.utils import load_image as diffusers_load_image  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

PREPROCESS_ATOL = 1e-6


def picture(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise plus a hard edge (what makes Lanczos, bilinear and bicubic differ),
    with a varying alpha channel, converted to ``mode``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgba = np.stack(
        [
            255 * x / max(width - 1, 1),
            255 * y / max(height - 1, 1),
            127.5 + 127.5 * np.sin(x / 3.0 + y / 5.0),
            64 + 191 * (x > width / 2),
        ],
        axis=-1,
    )
    rgba[..., :3] += rng.normal(0, 25, (height, width, 3))
    rgba[height // 3 : height // 2, :, 0] = 255  # a hard edge
    image = Image.fromarray(np.clip(rgba, 0, 255).astype(np.uint8), "RGBA")
    return image if mode == "RGBA" else image.convert("RGB").convert(mode)


def mask_picture(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Blobs near the binarize threshold: after resizing, many pixels fall either side of uint8 128."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 128 + 90 * np.sin(x / 4.0) * np.cos(y / 6.0)
    rgb = np.stack([base + rng.normal(0, 30, base.shape) for _ in range(3)], axis=-1)
    rgb[: height // 4, : width // 4] = 255  # a hard-edged white block
    rgb[-height // 4 :, -width // 4 :] = 0
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    if mode == "RGBA":
        image.putalpha(Image.fromarray((rng.uniform(0, 255, (height, width))).astype(np.uint8)))
        return image
    return image if mode == "RGB" else image.convert(mode)


def image_processor(vae_scale_factor: int) -> VaeImageProcessor:
    """As StableDiffusion{,XL}Img2Img/Inpaint, SD3 and FLUX construct their ``image_processor``."""
    return VaeImageProcessor(vae_scale_factor=vae_scale_factor)


def mask_processor(vae_scale_factor: int) -> VaeImageProcessor:
    """As the inpaint pipelines construct their ``mask_processor``."""
    return VaeImageProcessor(
        vae_scale_factor=vae_scale_factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True
    )


def assert_close(got: np.ndarray, expected, what: str, atol: float = PREPROCESS_ATOL) -> float:
    expected = expected.numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    assert got.dtype == np.float32, f"{what}: dtype {got.dtype}"
    diff = float(np.abs(got - expected).max())
    assert diff <= atol, f"{what}: max|diff| {diff} > {atol}"
    return diff


# --- sizes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [2, 8, 16])
@pytest.mark.parametrize("size", [(64, 48), (77, 53), (513, 769), (15, 17), (1024, 1024)])
def test_default_size_is_get_default_height_width(size, factor):
    width, height = size
    expected_h, expected_w = image_processor(factor).get_default_height_width(picture(width, height))
    assert images.default_size(width, height, factor) == (expected_w, expected_h)


# --- images ----------------------------------------------------------------------------------------

# (image width, height, mode, requested width, height, processor vae_scale_factor)
IMAGE_CASES = [
    (64, 48, "RGB", None, None, 8),  # already a multiple of 8: no resize
    (77, 53, "RGB", None, None, 8),  # SD/SDXL img2img: the image's size, rounded down -> 72x48, resized
    (100, 60, "RGB", 64, 48, 8),  # a requested size: downscale, aspect changed
    (50, 70, "RGB", 96, 84, 8),  # upscale; 84 rounds down to 80
    (77, 53, "RGBA", None, None, 8),  # alpha: dropped before the resize, as diffusers.utils.load_image does
    (61, 45, "L", None, None, 8),  # grayscale
    (33, 90, "P", 40, 72, 8),  # palette
    (150, 100, "RGB", None, None, 16),  # FLUX's processor: multiples of 16 -> 144x96
    (150, 100, "RGB", 100, 70, 16),  # FLUX with a requested size -> 96x64
]


@pytest.mark.parametrize("width, height, mode, req_w, req_h, factor", IMAGE_CASES)
def test_preprocess_image_is_vae_image_processor(width, height, mode, req_w, req_h, factor):
    image = picture(width, height, mode)
    expected = image_processor(factor).preprocess(diffusers_load_image(image), height=req_h, width=req_w)
    got = images.preprocess_image(image, req_w, req_h, vae_scale_factor=factor)
    assert_close(got, expected, f"{mode} {width}x{height} -> {req_w}x{req_h} (factor {factor})")
    assert got.flags.c_contiguous and -1.0 <= got.min() and got.max() <= 1.0


def test_preprocess_image_catches_the_wrong_filter():
    """Lanczos, as diffusers: bilinear or bicubic (plausible mistakes) are ~0.1 away on this picture,
    5 orders of magnitude above the tolerance, so the comparison above would fail on them."""
    image = picture(100, 60)
    expected = image_processor(8).preprocess(image, height=48, width=64).numpy()
    assert_close(images.preprocess_image(image, 64, 48, vae_scale_factor=8), expected, "lanczos")
    for wrong in (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC):
        resized = np.asarray(image.resize((64, 48), resample=wrong)).astype(np.float32) / 255.0
        assert np.abs((2 * resized - 1).transpose(2, 0, 1)[None] - expected).max() > 0.05, wrong


def test_preprocess_image_refuses_an_image_smaller_than_the_factor():
    with pytest.raises(EngineError, match="at least 16 pixels"):
        images.preprocess_image(picture(12, 40), vae_scale_factor=16)


# --- masks -----------------------------------------------------------------------------------------

MASK_CASES = [
    (64, 48, "RGB", None, None, 8),  # no resize
    (77, 53, "RGB", 72, 40, 8),  # an RGB mask, resized, then made grayscale
    (77, 53, "L", None, None, 8),
    (90, 70, "RGBA", 64, 64, 8),
    (90, 70, "1", 48, 40, 8),  # bilevel: Pillow resizes it with NEAREST on both sides
    (150, 100, "RGB", 100, 70, 16),  # FLUX inpaint's mask processor
]


@pytest.mark.parametrize("width, height, mode, req_w, req_h, factor", MASK_CASES)
def test_preprocess_mask_is_the_mask_processor(width, height, mode, req_w, req_h, factor):
    mask = mask_picture(width, height, mode)
    expected = mask_processor(factor).preprocess(mask, height=req_h, width=req_w)
    got = images.preprocess_mask(mask, req_w, req_h, vae_scale_factor=factor)
    assert_close(got, expected, f"{mode} mask {width}x{height} -> {req_w}x{req_h}")
    assert set(np.unique(got)) <= {0.0, 1.0}
    assert 0.05 < got.mean() < 0.95  # both values present: the threshold is exercised


def test_mask_binarizes_at_128_of_255():
    """White (>= 0.5 after /255, so uint8 >= 128) is repainted; 127 is kept."""
    values = np.array([[0, 126, 127, 128, 129, 255]], dtype=np.uint8).repeat(8, axis=0).repeat(8, axis=1)
    mask = Image.fromarray(values, "L")  # 48x8: a multiple of 8, no resize
    expected = mask_processor(8).preprocess(mask).numpy()
    got = images.preprocess_mask(mask, vae_scale_factor=8)
    assert_close(got, expected, "threshold")
    assert got[0, 0, 0, ::8].tolist() == [0, 0, 0, 1, 1, 1]


def test_mask_is_resized_before_it_is_made_grayscale():
    """diffusers resizes the RGB mask, then converts it to L. Converting first (a plausible mistake) flips
    pixels near the threshold on this mask, so the comparison above would catch it."""
    mask = mask_picture(77, 53, "RGB")
    expected = mask_processor(8).preprocess(mask, height=40, width=72).numpy()
    wrong = np.asarray(mask.convert("L").resize((72, 40), resample=Image.Resampling.LANCZOS)) / 255.0
    assert (np.where(wrong >= 0.5, 1.0, 0.0)[None, None] != expected).any()
    assert_close(images.preprocess_mask(mask, 72, 40, vae_scale_factor=8), expected, "RGB mask")


def test_masked_image_is_the_pipelines_product():
    image = picture(72, 40)
    init = image_processor(8).preprocess(image)
    mask = mask_processor(8).preprocess(mask_picture(72, 40))
    expected = init * (mask < 0.5)
    got = images.masked_image(init.numpy(), mask.numpy())
    assert_close(got, expected, "masked image", atol=0.0)


# --- the real pipelines' processors ------------------------------------------------------------------


def _pipelines():
    from diffusers import (
        FluxImg2ImgPipeline,
        FluxInpaintPipeline,
        StableDiffusion3Img2ImgPipeline,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
    )

    from exporters import tiny

    sd15, sdxl, sd3, flux = (tiny.build(n) for n in ("sd15", "sdxl", "sd3", "flux-schnell"))
    return {
        "StableDiffusionImg2ImgPipeline": StableDiffusionImg2ImgPipeline.from_pipe(sd15),
        "StableDiffusionInpaintPipeline": tiny.build("sd15-inpaint"),
        "StableDiffusionXLImg2ImgPipeline": StableDiffusionXLImg2ImgPipeline.from_pipe(sdxl),
        "StableDiffusionXLInpaintPipeline": StableDiffusionXLInpaintPipeline.from_pipe(sdxl),
        "StableDiffusion3Img2ImgPipeline": StableDiffusion3Img2ImgPipeline.from_pipe(sd3),
        "FluxImg2ImgPipeline": FluxImg2ImgPipeline.from_pipe(flux),
        "FluxInpaintPipeline": FluxInpaintPipeline.from_pipe(flux),
    }


@pytest.fixture(scope="module")
def pipelines():
    return _pipelines()


def processor_factor(pipeline) -> int:
    """The rule engine callers follow: the VAE's scale factor, twice it for FLUX (2x2 packed latents)."""
    vae = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    return 2 * vae if type(pipeline).__name__.startswith("Flux") else vae


def test_the_pipelines_processors_are_the_ones_reproduced(pipelines):
    for name, pipe in pipelines.items():
        config = pipe.image_processor.config
        assert config.resample == "lanczos" and config.do_resize and config.do_normalize, name
        assert not config.do_convert_rgb and not config.do_binarize and config.reducing_gap is None, name
        assert config.vae_scale_factor == processor_factor(pipe), name
        mask = getattr(pipe, "mask_processor", None)
        assert (mask is not None) == ("Inpaint" in name), name
        if mask is not None:
            m = mask.config
            assert m.resample == "lanczos" and m.do_binarize and m.do_convert_grayscale and not m.do_normalize, name
            assert m.vae_scale_factor == processor_factor(pipe) and m.reducing_gap is None, name


@pytest.mark.parametrize("size", [(78, 54, None, None), (90, 61, 70, 50)])
def test_preprocess_matches_each_pipelines_own_processors(pipelines, size):
    """78x54 is a multiple of the tiny VAE's factor 2 but not of FLUX's 4: the FLUX processors round it."""
    width, height, req_w, req_h = size
    image, mask = picture(width, height, "RGBA", seed=3), mask_picture(width, height, "RGB", seed=4)
    for name, pipe in pipelines.items():
        factor = processor_factor(pipe)
        expected = pipe.image_processor.preprocess(diffusers_load_image(image), height=req_h, width=req_w)
        got = images.preprocess_image(image, req_w, req_h, vae_scale_factor=factor)
        assert_close(got, expected, f"{name} image")
        if hasattr(pipe, "mask_processor"):
            expected = pipe.mask_processor.preprocess(mask, height=req_h, width=req_w)
            got = images.preprocess_mask(mask, req_w, req_h, vae_scale_factor=factor)
            assert_close(got, expected, f"{name} mask")


# --- mask → latent size --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, size",
    [
        ((1, 1, 64, 48), (8, 6)),  # SD: /8
        ((1, 1, 96, 144), (6, 9)),  # FLUX inpaint: latent size 2 * (H // 16)
        ((2, 1, 37, 23), (16, 9)),  # non-integer ratios
        ((1, 1, 100, 100), (3, 7)),
        ((1, 1, 16, 10), (37, 29)),  # upsampling
        ((1, 1, 12, 9), (24, 18)),  # exactly 2x (ATen's shift path)
        ((1, 3, 20, 30), (20, 30)),  # same size
        ((1, 1, 1000, 999), (333, 125)),
    ],
)
def test_mask_to_latents_is_nearest_interpolate(shape, size):
    mask = np.random.default_rng(0).uniform(size=shape).astype(np.float32)  # distinct values: index errors show
    expected = torch.nn.functional.interpolate(torch.from_numpy(mask), size=size)
    got = images.mask_to_latents(mask, *size)
    assert_close(got, expected, f"{shape} -> {size}", atol=0.0)


def test_mask_to_latents_of_a_preprocessed_mask():
    mask = mask_processor(8).preprocess(mask_picture(77, 53), height=40, width=72)
    expected = torch.nn.functional.interpolate(mask, size=(40 // 8, 72 // 8))
    assert_close(images.mask_to_latents(mask.numpy(), 5, 9), expected, "preprocessed mask", atol=0.0)


# --- latent sampling -----------------------------------------------------------------------------


def _sample_close(got: np.ndarray, expected: torch.Tensor, what: str) -> float:
    expected = expected.numpy()
    assert got.shape == expected.shape and got.dtype == np.float32, what
    diff = np.abs(got - expected)
    assert (diff <= 1e-6 * (1 + np.abs(expected))).all(), f"{what}: max|diff| {diff.max()}"
    return float(diff.max())


def test_sample_latent_distribution_from_a_vae_encoder():
    """The tiny SD VAE's encoder output: DiagonalGaussianDistribution.sample with a seeded torch generator,
    and ours with the very noise that generator draws."""
    from exporters import tiny

    vae = tiny.build("sd15").vae
    x = torch.from_numpy(images.preprocess_image(picture(40, 24), vae_scale_factor=2))
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    parameters = dist.parameters.numpy()
    expected = dist.sample(generator=torch.Generator().manual_seed(7))
    noise = randn_tensor(dist.mean.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float32).numpy()
    _sample_close(images.sample_latent_distribution(parameters, noise), expected, "sample")
    np.testing.assert_array_equal(images.latent_dist_mode(parameters), dist.mode().numpy())


def test_sample_latent_distribution_clamps_logvar():
    """logvar outside [-30, 20] is clamped before exp (std from 3e-7 to 2.2e4); 16 channels as SD3/FLUX."""
    rng = np.random.default_rng(1)
    mean = rng.normal(size=(2, 16, 5, 7)).astype(np.float32)
    logvar = rng.uniform(-45, 35, size=mean.shape).astype(np.float32)
    parameters = np.concatenate([mean, logvar], axis=1)
    assert (logvar < -30).any() and (logvar > 20).any()
    dist = DiagonalGaussianDistribution(torch.from_numpy(parameters))
    expected = dist.sample(generator=torch.Generator().manual_seed(3))
    noise = randn_tensor(mean.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float32).numpy()
    _sample_close(images.sample_latent_distribution(parameters, noise), expected, "clamped sample")
    np.testing.assert_array_equal(images.latent_dist_mode(parameters), dist.mode().numpy())
    with pytest.raises(ValueError, match="shape"):
        images.sample_latent_distribution(parameters, noise[:, :8])


# --- loading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, suffix", [("RGBA", ".png"), ("L", ".png"), ("P", ".png"), ("RGB", ".jpg")])
def test_load_image_is_diffusers_load_image(tmp_path, mode, suffix):
    path = tmp_path / f"in{suffix}"
    picture(45, 31, mode).save(path)
    got, expected = images.load_image(path), diffusers_load_image(str(path))
    assert got.mode == expected.mode == "RGB" and got.size == expected.size == (45, 31)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_load_image_applies_the_exif_orientation(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    picture(40, 24).save(path, exif=exif)
    got, expected = images.load_image(path), diffusers_load_image(str(path))
    assert got.size == expected.size == (24, 40)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"not an image at all\n", "is not an image Pillow can read"),
        (None, "is not an image Pillow can read"),  # a PNG cut short
    ],
)
def test_load_image_names_a_file_that_is_not_an_image(tmp_path, content, expected):
    path = tmp_path / "IN.png"
    if content is None:
        picture(64, 64).save(path)
        content = path.read_bytes()[:200]
    path.write_bytes(content)
    with pytest.raises(EngineError) as info:
        images.load_image(path)
    message = str(info.value)
    assert message.startswith(f"{path} ") and expected in message and message.endswith("pass a PNG or JPEG")
    assert "\n" not in message


def test_load_image_names_a_missing_file_and_a_folder(tmp_path):
    with pytest.raises(EngineError, match="does not exist; pass the path of a PNG or JPEG"):
        images.load_image(tmp_path / "missing.png")
    with pytest.raises(EngineError, match="is not a file"):
        images.load_image(tmp_path)
