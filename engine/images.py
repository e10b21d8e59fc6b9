"""Input images for image-to-image and inpainting, as diffusers 0.39's pipelines prepare them (numpy + Pillow).

The pipelines (StableDiffusion{,XL}{Img2Img,Inpaint}Pipeline, StableDiffusion3Img2ImgPipeline,
Flux{Img2Img,Inpaint}Pipeline) run every input image through a ``VaeImageProcessor``
(diffusers/image_processor.py) with its defaults: resize with Pillow's Lanczos filter to the requested size
rounded *down* to a multiple of ``vae_scale_factor`` (the image's own size when none is requested), scale to
[0, 1] and then to [-1, 1]. The inpaint pipelines' ``mask_processor`` (``do_normalize=False,
do_binarize=True, do_convert_grayscale=True``) resizes the mask the same way (Lanczos too), *then* converts it
to grayscale, scales to [0, 1] and binarizes at 0.5: white (uint8 >= 128) is repainted, black kept.

``vae_scale_factor`` is the processor's, which is not always the VAE's: SD, SDXL and SD3 use the VAE's
(``2 ** (len(block_out_channels) - 1)``, 8 for the real models); FLUX uses twice that (16), because its
latents are packed 2x2.

The functions apply the same Pillow calls in the same order as diffusers, so they agree with it to the last
bit (tests/test_images.py). The VAE encoder's output (``latent_parameters``: mean and log-variance stacked on
axis 1) becomes latents as diffusers' ``DiagonalGaussianDistribution`` does; the caller draws the noise.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import EngineError

# diffusers' VaeImageProcessor(resample="lanczos"), its default and what every pipeline above uses
RESAMPLE = Image.Resampling.LANCZOS
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # DiagonalGaussianDistribution's clamp


def load_image(path) -> Image.Image:
    """The image at ``path`` as ``diffusers.utils.load_image`` gives it: EXIF orientation applied, RGB.

    Raises EngineError (one line: the problem and the fix) for a missing file or one that is not an image.
    """
    path = Path(path)
    if not path.exists():
        raise EngineError(f"{path} does not exist; pass the path of a PNG or JPEG")
    if not path.is_file():
        raise EngineError(f"{path} is not a file; pass the path of a PNG or JPEG")
    return _read(path, f"{path}", "pass a PNG or JPEG")


def image_from_bytes(data: bytes, what: str = "the image", mode: str | None = "RGB") -> Image.Image:
    """An image sent as bytes (the server's uploads), read as ``load_image`` reads a file; ``mode`` None keeps
    the image's own mode (an alpha channel a mask is read from). ``what`` names it in the error."""
    return _read(io.BytesIO(data), what, "send a PNG or JPEG", mode)


def _read(source, what: str, fix: str, mode: str | None = "RGB") -> Image.Image:
    try:
        with Image.open(source) as opened:
            image = ImageOps.exif_transpose(opened)  # reads the pixels: a truncated file fails here
            return image.convert(mode) if mode else image.copy()
    except Exception as exc:  # UnidentifiedImageError, truncated data, decompression bombs, ...
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise EngineError(f"{what} is not an image Pillow can read ({reason}); {fix}") from None


def default_size(image_w: int, image_h: int, vae_scale_factor: int) -> tuple[int, int]:
    """``(width, height)`` rounded down to multiples of ``vae_scale_factor``, as diffusers'
    ``VaeImageProcessor.get_default_height_width`` (which returns them the other way round, height first).

    With the image's own size, this is the size SD/SDXL img2img generate at (they pass no height/width).
    """
    if vae_scale_factor < 1:
        raise ValueError(f"vae_scale_factor must be positive, got {vae_scale_factor}")
    return int(image_w) - int(image_w) % vae_scale_factor, int(image_h) - int(image_h) % vae_scale_factor


def _resized(image: Image.Image, width: int | None, height: int | None, vae_scale_factor: int) -> Image.Image:
    """VaeImageProcessor.preprocess's size handling and resize (resize_mode "default")."""
    w, h = default_size(
        image.width if width is None else width, image.height if height is None else height, vae_scale_factor
    )
    if w <= 0 or h <= 0:
        raise EngineError(
            f"the image would be resized to {w}x{h} pixels ({image.width}x{image.height} asked as "
            f"{width or image.width}x{height or image.height}, rounded down to multiples of {vae_scale_factor}); "
            f"use an image and a size of at least {vae_scale_factor} pixels each side"
        )
    return image.resize((w, h), resample=RESAMPLE, reducing_gap=None)


def preprocess_image(
    image: Image.Image, width: int | None = None, height: int | None = None, *, vae_scale_factor: int
) -> np.ndarray:
    """``VaeImageProcessor(vae_scale_factor=...).preprocess(image, height=height, width=width)``:
    float32 (1, 3, H, W) in [-1, 1].

    ``width``/``height`` None take the image's; either way they are rounded down to multiples of
    ``vae_scale_factor`` (the processor's: 8 for SD/SDXL/SD3, 16 for FLUX) and the image is resized to them
    with Lanczos. A non-RGB image (RGBA, grayscale, palette) is converted to RGB first, as
    ``diffusers.utils.load_image`` does before a pipeline sees it (the processor itself would pass an RGBA
    image on as four channels).
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    image = _resized(image, width, height, vae_scale_factor)
    array = np.asarray(image).astype(np.float32) / 255.0  # pil_to_numpy
    array = 2.0 * array - 1.0  # normalize
    return np.ascontiguousarray(array.transpose(2, 0, 1)[None])


def preprocess_mask(
    image: Image.Image, width: int | None = None, height: int | None = None, *, vae_scale_factor: int
) -> np.ndarray:
    """The inpaint pipelines' ``mask_processor.preprocess(mask, height=height, width=width)``:
    float32 (1, 1, H, W) of 0 (keep) and 1 (repaint).

    Resized as given (any mode) with Lanczos to the size ``preprocess_image`` uses, *then* converted to
    grayscale (ITU-R 601 luma, Pillow's ``convert("L")``), scaled to [0, 1] and binarized: >= 0.5, i.e.
    uint8 >= 128, is 1.
    """
    image = _resized(image, width, height, vae_scale_factor).convert("L")
    array = np.asarray(image).astype(np.float32) / 255.0
    array = np.where(array >= 0.5, np.float32(1.0), np.float32(0.0))  # binarize
    return np.ascontiguousarray(array[None, None])


def masked_image(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``init_image * (mask_condition < 0.5)``: the image with the part to repaint zeroed (grey, in [-1, 1]),
    which the inpaint pipelines encode as the masked-image latents."""
    return image * (mask < 0.5)


def mask_to_latents(mask: np.ndarray, latent_h: int, latent_w: int) -> np.ndarray:
    """``torch.nn.functional.interpolate(mask, size=(latent_h, latent_w))`` (mode "nearest") for an
    (N, C, H, W) array: output index i reads input index ``min(floor(i * (H / latent_h)), H - 1)``, the
    ratio and the product in float32 as PyTorch computes them."""
    mask = np.asarray(mask)
    if mask.ndim != 4:
        raise ValueError(f"mask must be (N, C, H, W), got shape {mask.shape}")
    rows = _nearest_indices(mask.shape[2], int(latent_h))
    cols = _nearest_indices(mask.shape[3], int(latent_w))
    return np.ascontiguousarray(mask[:, :, rows[:, None], cols[None, :]])


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """ATen's nearest_idx (aten/src/ATen/native/UpSample.h)."""
    if out_size < 1:
        raise ValueError(f"output size must be positive, got {out_size}")
    index = np.arange(out_size)
    if out_size == in_size:
        return index
    if out_size == 2 * in_size:
        return index >> 1
    scale = np.float32(in_size) / np.float32(out_size)
    source = np.floor(index.astype(np.float32) * scale).astype(np.int64)
    return np.minimum(source, in_size - 1)


def _mean_logvar(parameters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    parameters = np.asarray(parameters)
    if parameters.ndim < 2 or parameters.shape[1] % 2:
        raise ValueError(f"latent parameters must have an even axis 1 (mean, logvar), got shape {parameters.shape}")
    mean, logvar = np.split(parameters, 2, axis=1)
    return mean, logvar


def sample_latent_distribution(parameters: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """``DiagonalGaussianDistribution(parameters).sample()`` with the caller's standard-normal ``noise``
    (float32, the shape of the mean, i.e. ``parameters`` with half its channels): ``mean + std * noise``
    with ``std = exp(0.5 * clamp(logvar, -30, 20))``. What ``retrieve_latents`` returns for every
    img2img/inpaint pipeline above (before the pipeline's shift and scaling factor)."""
    mean, logvar = _mean_logvar(parameters)
    noise = np.asarray(noise)
    if noise.shape != mean.shape:
        raise ValueError(f"noise must have the mean's shape {mean.shape}, got {noise.shape}")
    logvar = np.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)
    std = np.exp(0.5 * logvar)
    return mean + std * noise


def latent_dist_mode(parameters: np.ndarray) -> np.ndarray:
    """``DiagonalGaussianDistribution(parameters).mode()``: the mean (``retrieve_latents(sample_mode="argmax")``)."""
    mean, _ = _mean_logvar(parameters)
    return np.ascontiguousarray(mean)
