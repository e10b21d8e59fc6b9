"""Latents ↔ pixels through the VAE graphs, with the model's scaling and shift, as diffusers does it.

Tiling (``--vae-tiling``): diffusers 0.39's ``AutoencoderKL.enable_tiling()`` in numpy around the same
graphs. The decoder runs on overlapping latent tiles of ``tile_latent_min_size`` (stride 75% of it), the
encoder on overlapping pixel tiles of ``tile_sample_min_size``; each tile is blended linearly into the one
above and the one to its left over ``tile_overlap_factor`` (25%) of a tile and cropped, as ``tiled_decode``
and ``_tiled_encode`` do (``blend_v``/``blend_h`` write into the tile, so a tile is blended with neighbours
that were blended already). The encoder's tiles are latent parameters, sampled afterwards as untiled ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .errors import EngineError
from .images import sample_latent_distribution

# What every real VAE of the registry's families has (SD 1.5, SDXL, SD 3, FLUX): the conservative stand-in
# for an export whose manifest and vae_decoder/config.json say nothing.
DEFAULT_BLOCK_OUT_CHANNELS = (128, 256, 512, 512)
TILE_OVERLAP_FACTOR = 0.25  # AutoencoderKL.tile_overlap_factor
# AutoencoderKLQwenImage's tiling (enable_tiling's defaults) is this same scheme: 256 px tiles at a 192 px stride
# (tile_sample_min_height/stride_height), blended over 64 px (8 latents for the encoder's tiles), each tile cropped
# to the stride; its tiles are not clamped, nor is its decoder graph (exporters/qwen_image/vae.py), so Tiling(256,
# 32) decodes and encodes as its tiled_decode/tiled_encode do.
QWEN_TILE_SAMPLE_SIZE = 256


def vae_layout(manifest) -> dict:
    """The VAE's ``sample_size`` (diffusers' tile size), ``block_out_channels`` and whether its mid block has
    attention: from the manifest's config (exports since these fields), else from ``vae_decoder/config.json``
    (diffusers' config, written beside the graph by every export), else the real VAEs' values."""
    config = getattr(manifest, "config", None) or {}
    layout = {
        "sample_size": config.get("vae_sample_size"),
        "block_out_channels": config.get("vae_block_out_channels"),
        "mid_block_attention": config.get("vae_mid_block_attention"),
    }
    if None in layout.values():
        try:
            saved = json.loads((manifest.folder / "vae_decoder" / "config.json").read_text())
        except (OSError, ValueError, AttributeError, TypeError):
            saved = {}
        size = saved.get("sample_size")
        fallback = {
            "sample_size": size[0] if isinstance(size, list) and size else size,
            "block_out_channels": saved.get("block_out_channels"),
            "mid_block_attention": saved.get("mid_block_add_attention", True if saved else None),
        }
        if saved.get("_class_name") == "AutoencoderKLQwenImage":
            fallback = {  # its tiles are a fixed 256 px (not in its config); its mid block always has attention
                "sample_size": QWEN_TILE_SAMPLE_SIZE,
                "block_out_channels": [saved.get("base_dim", 96) * m for m in saved.get("dim_mult", (1, 2, 4, 4))],
                "mid_block_attention": True,
            }
        layout = {key: fallback[key] if value is None else value for key, value in layout.items()}
    if not layout["block_out_channels"]:
        layout["block_out_channels"] = list(DEFAULT_BLOCK_OUT_CHANNELS)
    if layout["mid_block_attention"] is None:
        layout["mid_block_attention"] = True
    if not layout["sample_size"]:
        layout["sample_size"] = int(config.get("default_image_size") or 512)
    return layout


@dataclass(frozen=True)
class Tiling:
    """AutoencoderKL's tile fields: ``tile_sample_min_size`` (pixels) and ``tile_latent_min_size`` (latents)."""

    sample_size: int
    latent_size: int
    overlap_factor: float = TILE_OVERLAP_FACTOR

    @classmethod
    def of(cls, manifest) -> Tiling:
        """As AutoencoderKL.__init__ sets them: the VAE's sample_size, and that over 2^(blocks - 1)."""
        layout = vae_layout(manifest)
        size = int(layout["sample_size"])
        return cls(size, int(size / (2 ** (len(layout["block_out_channels"]) - 1))))


def blend_v(a: np.ndarray, b: np.ndarray, blend_extent: int) -> np.ndarray:
    """AutoencoderKL.blend_v: the top rows of ``b`` fade in from the bottom rows of ``a``; writes into ``b``."""
    blend_extent = min(a.shape[2], b.shape[2], blend_extent)
    for y in range(blend_extent):
        w = np.float32(y / blend_extent)
        b[:, :, y, :] = a[:, :, -blend_extent + y, :] * (np.float32(1) - w) + b[:, :, y, :] * w
    return b


def blend_h(a: np.ndarray, b: np.ndarray, blend_extent: int) -> np.ndarray:
    """AutoencoderKL.blend_h: the left columns of ``b`` fade in from the right columns of ``a``; writes into ``b``."""
    blend_extent = min(a.shape[3], b.shape[3], blend_extent)
    for x in range(blend_extent):
        w = np.float32(x / blend_extent)
        b[:, :, :, x] = a[:, :, :, -blend_extent + x] * (np.float32(1) - w) + b[:, :, :, x] * w
    return b


def _tiled(run, x: np.ndarray, tile: int, stride: int, blend_extent: int, row_limit: int) -> np.ndarray:
    """The loop tiled_decode and _tiled_encode share: ``run`` each tile of ``tile`` x ``tile`` at ``stride``,
    blend each into the tile above and the tile to its left, crop to ``row_limit`` and concatenate."""
    rows = []
    for i in range(0, x.shape[2], stride):
        rows.append([run(x[:, :, i : i + tile, j : j + tile]) for j in range(0, x.shape[3], stride)])
    result_rows = []
    for i, row in enumerate(rows):
        result_row = []
        for j, part in enumerate(row):
            if i > 0:
                part = blend_v(rows[i - 1][j], part, blend_extent)
            if j > 0:
                part = blend_h(row[j - 1], part, blend_extent)
            result_row.append(part[:, :, :row_limit, :row_limit])
        result_rows.append(np.concatenate(result_row, axis=3))
    return np.concatenate(result_rows, axis=2)


class TiledDecoder:
    """A VAE decoder graph run as ``AutoencoderKL.decode`` with tiling on: latents larger than a tile are
    decoded tile by tile (``tiled_decode``), smaller ones in one run. Called like the graph."""

    def __init__(self, graph, tiling: Tiling):
        self.graph, self.tiling = graph, tiling

    def decode(self, z: np.ndarray) -> np.ndarray:
        t = self.tiling
        if not (z.shape[-1] > t.latent_size or z.shape[-2] > t.latent_size):
            return self.graph(latent_sample=z)["sample"]
        stride = int(t.latent_size * (1 - t.overlap_factor))
        blend_extent = int(t.sample_size * t.overlap_factor)
        row_limit = t.sample_size - blend_extent

        def run(tile):
            return np.array(self.graph(latent_sample=np.ascontiguousarray(tile))["sample"], dtype=np.float32)

        return _tiled(run, z, t.latent_size, stride, blend_extent, row_limit)

    def __call__(self, outputs=None, *, latent_sample) -> dict[str, np.ndarray]:
        return {"sample": self.decode(np.asarray(latent_sample, dtype=np.float32))}


class TiledEncoder:
    """A VAE encoder graph run as ``AutoencoderKL.encode`` with tiling on: images wider or taller than a tile
    are encoded tile by tile (``_tiled_encode``) into latent parameters. Called like the graph."""

    def __init__(self, graph, tiling: Tiling):
        self.graph, self.tiling = graph, tiling

    def encode(self, x: np.ndarray) -> np.ndarray:
        t = self.tiling
        if not (x.shape[3] > t.sample_size or x.shape[2] > t.sample_size):
            return self.graph(sample=x)["latent_parameters"]
        stride = int(t.sample_size * (1 - t.overlap_factor))
        blend_extent = int(t.latent_size * t.overlap_factor)
        row_limit = t.latent_size - blend_extent

        def run(tile):
            return np.array(self.graph(sample=np.ascontiguousarray(tile))["latent_parameters"], dtype=np.float32)

        return _tiled(run, x, t.sample_size, stride, blend_extent, row_limit)

    def __call__(self, outputs=None, *, sample) -> dict[str, np.ndarray]:
        return {"latent_parameters": self.encode(np.asarray(sample, dtype=np.float32))}


class Vae:
    """The export's VAE constants; the graphs come from the phase that runs them.

    Two latent normalisations, as the config says: a scaling factor and shift (SD, SDXL, SD3, FLUX), or, when
    the config has ``vae_latents_mean``/``vae_latents_std`` (Qwen-Image), per-channel statistics in their
    place, applied in float32 in diffusers' order: ``QwenImagePipeline`` decodes ``latents / (1 / std) + mean``
    and ``QwenImageImg2ImgPipeline._encode_vae_image`` encodes ``(latents - mean) * (1 / std)``."""

    def __init__(self, config: dict, tiling: Tiling | None = None):
        self.scaling_factor = float(config["vae_scaling_factor"])
        self.shift_factor = float(config.get("vae_shift_factor") or 0.0)
        self.tiling = tiling  # the export's tile sizes, for the generations that decode in tiles
        mean, std = config.get("vae_latents_mean"), config.get("vae_latents_std")
        self.latents_mean = self.latents_inv_std = None
        if mean is not None or std is not None:
            if mean is None or std is None or len(mean) != len(std):
                raise EngineError("the export's vae_latents_mean and vae_latents_std do not match; export it again")
            # torch.tensor(config.latents_mean) and 1.0 / torch.tensor(config.latents_std): float32, per channel
            self.latents_mean = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
            self.latents_inv_std = np.float32(1.0) / np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)

    def _to_vae(self, latents: np.ndarray) -> np.ndarray:
        """The denoiser's latents → what the decoder takes."""
        if self.latents_mean is not None:
            return np.asarray(latents, dtype=np.float32) / self.latents_inv_std + self.latents_mean
        return latents / self.scaling_factor + self.shift_factor

    def _from_vae(self, latents: np.ndarray) -> np.ndarray:
        """Latents sampled from the encoder → the denoiser's."""
        if self.latents_mean is not None:
            return (np.asarray(latents, dtype=np.float32) - self.latents_mean) * self.latents_inv_std
        return (latents - np.float32(self.shift_factor)) * np.float32(self.scaling_factor)

    def decode(self, graph, latents: np.ndarray) -> np.ndarray:
        """(1, C, h, w) latents → (H, W, 3) uint8, as diffusers' VaeImageProcessor.postprocess(output_type="pil")."""
        scaled = self._to_vae(latents)
        image = graph(latent_sample=scaled.astype(np.float32))["sample"][0]
        if not np.isfinite(image).all():
            raise EngineError("the VAE decoder's output is NaN or infinite; export the model again")
        image = np.clip(image / 2 + 0.5, 0.0, 1.0)
        return (image.transpose(1, 2, 0) * 255).round().astype(np.uint8)

    def encode(self, graph, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(1, 3, H, W) pixels in [-1, 1] → scaled latents, sampled from the latent distribution as
        ``retrieve_latents(vae.encode(image), generator)`` does (one standard-normal draw of the mean's shape;
        Qwen-Image's has a frame axis of one, the same numbers in the same order)."""
        parameters = graph(sample=pixels.astype(np.float32))["latent_parameters"]
        shape = (parameters.shape[0], parameters.shape[1] // 2, *parameters.shape[2:])
        latents = sample_latent_distribution(parameters, rng.standard_normal(shape, dtype=np.float32))
        return self._from_vae(latents).astype(np.float32)
