"""Tiled VAE decode and encode (engine/vae.py) against diffusers 0.39's ``AutoencoderKL.enable_tiling()``.

The same tiny VAE (``exporters.tiny``: two blocks, scale factor 2) runs in PyTorch with tiling on and, exported,
through our numpy stitching. Tiles of 32 pixels / 16 latents are set on both sides so that several tiles, their
overlaps and partial last tiles happen on small, non-square inputs. Tolerance: 1e-4 absolute on the decoded
pixels (the untiled ONNX Runtime graph is ~1e-6 from PyTorch) and on the encoder's latent parameters and samples.
The negative checks show the tolerance sees what matters: without the blending, or untiled, the output is
far from diffusers' tiled one.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import engine.vae as vae_module  # noqa: E402
from engine.images import sample_latent_distribution  # noqa: E402
from engine.session import Graph  # noqa: E402
from engine.vae import TiledDecoder, TiledEncoder, Tiling, Vae, vae_layout  # noqa: E402
from exporters import tiny  # noqa: E402
from registry import manifest as manifest_format  # noqa: E402

ATOL = 1e-4
TILING = Tiling(sample_size=32, latent_size=16)  # the tiny VAE's scale factor is 2
VAE_MODULE = "diffusers.models.autoencoders.vae"

# latent (h, w): rows/columns of tiles at a stride of 12 latents, the last ones partial
DECODE_SIZES = [(24, 40), (37, 21), (16, 29)]
# pixel (H, W): strides of 24 pixels
ENCODE_SIZES = [(72, 104), (50, 33)]


@pytest.fixture(scope="module")
def export(exported_tiny):
    return exported_tiny("sd15")


@pytest.fixture(scope="module")
def reference():
    """The tiny SD 1.5 VAE in PyTorch, tiling on with the test's tile sizes."""
    vae = tiny.build("sd15").vae
    vae.enable_tiling()
    vae.tile_sample_min_size = TILING.sample_size
    vae.tile_latent_min_size = TILING.latent_size
    assert vae.tile_overlap_factor == TILING.overlap_factor
    return vae


def _latents(h, w, seed=0):
    return np.random.default_rng(seed).standard_normal((1, 4, h, w), dtype=np.float32)


def _pixels(h, w, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (1, 3, h, w)).astype(np.float32)


def _ref_decode(vae, z):
    with torch.no_grad():
        return vae.decode(torch.from_numpy(z)).sample.numpy()


def _ref_parameters(vae, x):
    with torch.no_grad():
        return vae.encode(torch.from_numpy(x)).latent_dist.parameters.numpy()


@pytest.mark.parametrize("h,w", DECODE_SIZES)
def test_tiled_decode_matches_diffusers(export, reference, h, w):
    z = _latents(h, w)
    graph = Graph(export / "vae_decoder" / "model.onnx")
    ours = TiledDecoder(graph, TILING).decode(z)
    ref = _ref_decode(reference, z)
    assert ours.shape == ref.shape == (1, 3, 2 * h, 2 * w)
    assert np.abs(ours - ref).max() <= ATOL
    # the check can see a difference: decoding untiled is far from the tiled reference
    untiled = graph(latent_sample=z)["sample"]
    assert np.abs(untiled - ref).max() > 100 * ATOL


def test_tiled_decode_without_blending_fails(export, reference, monkeypatch):
    """Negative check: the same tiles, cropped and stitched without blend_v/blend_h, are not diffusers'."""
    z = _latents(*DECODE_SIZES[0])
    ref = _ref_decode(reference, z)
    monkeypatch.setattr(vae_module, "blend_v", lambda a, b, extent: b)
    monkeypatch.setattr(vae_module, "blend_h", lambda a, b, extent: b)
    unblended = TiledDecoder(Graph(export / "vae_decoder" / "model.onnx"), TILING).decode(z)
    assert unblended.shape == ref.shape
    assert np.abs(unblended - ref).max() > 100 * ATOL


def test_blending_reads_tiles_that_were_blended_already(export, reference):
    """blend_v/blend_h write into the tile, and the next tile blends with the written one (diffusers' order):
    blending from untouched copies of the tiles is not diffusers' result."""
    z = _latents(*DECODE_SIZES[0], seed=1)
    ref = _ref_decode(reference, z)
    graph = Graph(export / "vae_decoder" / "model.onnx")

    def copying(blend):
        return lambda a, b, extent: blend(a.copy(), b.copy(), extent)

    with pytest.MonkeyPatch.context() as mp:
        originals = {}
        for name in ("blend_v", "blend_h"):
            originals[name] = getattr(vae_module, name)
            mp.setattr(vae_module, name, copying(originals[name]))
        # copies of the inputs: the tile's own array is no longer written, so later neighbours see it unblended
        out_of_place = TiledDecoder(graph, TILING).decode(z)
    assert np.abs(TiledDecoder(graph, TILING).decode(z) - ref).max() <= ATOL
    assert np.abs(out_of_place - ref).max() > 10 * ATOL


@pytest.mark.parametrize("h,w", ENCODE_SIZES)
def test_tiled_encode_matches_diffusers(export, reference, monkeypatch, h, w):
    x = _pixels(h, w)
    graph = Graph(export / "vae_encoder" / "model.onnx")
    params = TiledEncoder(graph, TILING).encode(x)
    ref_params = _ref_parameters(reference, x)
    assert params.shape == ref_params.shape == (1, 8, h // 2, w // 2)
    assert np.abs(params - ref_params).max() <= ATOL
    assert np.abs(graph(sample=x)["latent_parameters"] - ref_params).max() > 100 * ATOL  # tiling mattered

    # sampled with the same noise: ours through sample_latent_distribution, diffusers' latent_dist.sample()
    noise = np.random.default_rng(7).standard_normal((1, 4, h // 2, w // 2), dtype=np.float32)
    monkeypatch.setattr(f"{VAE_MODULE}.randn_tensor", lambda shape, **kw: torch.from_numpy(noise).reshape(shape))
    with torch.no_grad():
        ref_sample = reference.encode(torch.from_numpy(x)).latent_dist.sample().numpy()
    assert np.abs(sample_latent_distribution(params, noise) - ref_sample).max() <= ATOL


def test_small_inputs_are_not_tiled(export, reference):
    """diffusers tiles only what is larger than a tile; so do we (the graph runs once)."""
    z = _latents(16, 12)
    graph = Graph(export / "vae_decoder" / "model.onnx")
    assert np.abs(TiledDecoder(graph, TILING).decode(z) - _ref_decode(reference, z)).max() <= ATOL
    x = _pixels(32, 20)
    encoder = Graph(export / "vae_encoder" / "model.onnx")
    assert np.abs(TiledEncoder(encoder, TILING).encode(x) - _ref_parameters(reference, x)).max() <= ATOL


def test_the_export_records_the_tile_sizes(export, reference):
    """The manifest carries what tiling needs: AutoencoderKL's own tile sizes come out of it."""
    fresh = tiny.build("sd15").vae
    manifest = manifest_format.read(export)
    assert Tiling.of(manifest) == Tiling(fresh.tile_sample_min_size, fresh.tile_latent_min_size)
    assert manifest.config["vae_sample_size"] == fresh.config.sample_size
    assert manifest.config["vae_block_out_channels"] == list(fresh.config.block_out_channels)


def test_old_manifests_read_the_vae_config_beside_the_graph(export):
    """An export from before these fields: its vae_decoder/config.json (diffusers' config) gives the same layout."""
    manifest = manifest_format.read(export)
    old = manifest_format.Manifest(manifest.folder, {**manifest.data, "config": dict(manifest.config)})
    for key in ("vae_sample_size", "vae_block_out_channels", "vae_mid_block_attention"):
        old.config.pop(key)
    assert vae_layout(old) == vae_layout(manifest)


def test_vae_decode_with_a_tiled_graph_is_diffusers_image(export, reference):
    """Vae.decode (scaling, postprocess) takes the tiled decoder in the graph's place."""
    manifest = manifest_format.read(export)
    vae = Vae(manifest.config, TILING)
    latents = _latents(24, 40, seed=3)
    picture = vae.decode(TiledDecoder(Graph(export / "vae_decoder" / "model.onnx"), TILING), latents)
    ref = _ref_decode(reference, latents / vae.scaling_factor)[0]
    expected = (np.clip(ref / 2 + 0.5, 0, 1).transpose(1, 2, 0) * 255).round()
    assert picture.shape == (48, 80, 3)
    assert np.abs(picture.astype(np.int16) - expected).max() <= 1
