"""Qwen-Image's VAE: the exported one-frame graphs (exporters/qwen_image/vae.py) and the engine's per-channel
latent statistics (engine/vae.py), against diffusers 0.39's ``AutoencoderKLQwenImage`` and the pipelines' own
arithmetic.

The tiny VAE has the real layout (z_dim 16, the real latents_mean/std, scale factor 8, a mid-block attention).
References are PyTorch: ``QwenImagePipeline``'s decode path (un-normalise, ``vae.decode(latents)[0][:, :, 0]``
on the 5-D one-frame latent, ``VaeImageProcessor.postprocess`` to PIL), ``vae.encode`` on the 5-D image and
``QwenImageImg2ImgPipeline._encode_vae_image`` itself, and ``enable_tiling()``'s tiled decode/encode.
Tolerances: 1/255 on uint8 pixels (one rounding step), 1e-4 on float outputs (the graphs are ~1e-6 from PyTorch).
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from engine.session import Graph  # noqa: E402
from engine.vae import TiledDecoder, TiledEncoder, Tiling, Vae, vae_layout  # noqa: E402
from exporters import backends, components, validate  # noqa: E402
from exporters.qwen_image import vae as qwen_vae  # noqa: E402

ATOL = 1e-4
Z = 16
# latent (h, w): square and not; the image is 8x
SIZES = [(16, 16), (12, 20)]


@pytest.fixture(scope="module")
def vae():
    return qwen_vae.tiny_vae(0)


@pytest.fixture(scope="module")
def exported(vae, tmp_path_factory):
    """Both graphs through the plain torch.onnx exporter (what ``backends.make(False, pipeline)`` gives), with
    the validation an export runs (exporters/validate.py: cases "a" and "b", batch 1 and 2, non-square)."""
    folder = tmp_path_factory.mktemp("qwen_vae")
    pipeline = types.SimpleNamespace(vae=vae)
    checks = {}
    for name in ("vae_decoder", "vae_encoder"):
        component = components.make(pipeline, name)
        path = folder / name / "model.onnx"
        backends.TorchOnnx().export(component, path, 17)
        checks[name] = validate.check(component, path, validate.references(component))
    vae.save_config(str(folder / "vae_decoder"))
    return folder, checks


def _config():
    return qwen_vae.config_keys(qwen_vae.tiny_vae(0))


def _latents(h, w, seed=0):
    return np.random.default_rng(seed).standard_normal((1, Z, h, w), dtype=np.float32)


def _pixels(h, w, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (1, 3, h, w)).astype(np.float32)


def test_components_dispatch_on_the_vae_class(vae):
    pipeline = types.SimpleNamespace(vae=vae)
    decoder, encoder = components.make(pipeline, "vae_decoder"), components.make(pipeline, "vae_encoder")
    assert components._vae_scale(vae) == 8 == vae.spatial_compression_ratio
    assert (decoder.kind, list(decoder.inputs), list(decoder.outputs)) == ("vae-decoder", ["latent_sample"], ["sample"])
    assert (encoder.kind, list(encoder.inputs), list(encoder.outputs)) == (
        "vae-encoder",
        ["sample"],
        ["latent_parameters"],
    )
    assert decoder.example("a")["latent_sample"].shape[1] == Z
    assert vae.config.latents_mean == qwen_vae.LATENTS_MEAN and vae.config.latents_std == qwen_vae.LATENTS_STD


def test_graphs_validate_at_two_shapes_and_are_one_frame_2d(exported):
    import onnx

    folder, checks = exported
    for name, result in checks.items():
        assert result["max_abs_diff"] <= ATOL, (name, result)
        assert result["shapes"][0] != result["shapes"][1]
        graph = onnx.load(str(folder / name / "model.onnx"))
        # the causal 3-D convolutions were traced as 2-D ones (the last temporal tap), nothing 5-D is left
        assert not [t.name for t in graph.graph.initializer if len(t.dims) == 5]
        assert {n.op_type for n in graph.graph.node} >= {"Conv"}
    assert checks["vae_decoder"]["shapes"] == [{"latent_sample": [1, Z, 32, 24]}, {"latent_sample": [2, Z, 16, 40]}]


@pytest.mark.parametrize("h,w", SIZES)
def test_decode_matches_the_qwen_image_pipeline(vae, exported, h, w):
    from diffusers.image_processor import VaeImageProcessor

    folder, _ = exported
    latents = _latents(h, w, seed=h * w)
    ours = Vae(_config()).decode(Graph(folder / "vae_decoder" / "model.onnx"), latents)

    # QwenImagePipeline.__call__ after _unpack_latents (pipeline_qwenimage.py), on its (1, z, 1, h, w) latents
    with torch.no_grad():
        x = torch.from_numpy(latents).unsqueeze(2)
        latents_mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(x.device, x.dtype)
        latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(
            x.device, x.dtype
        )
        x = x / latents_std + latents_mean
        image = vae.decode(x, return_dict=False)[0][:, :, 0]
        ref = np.array(VaeImageProcessor(vae_scale_factor=16).postprocess(image, output_type="pil")[0])

    assert ours.shape == ref.shape == (8 * h, 8 * w, 3)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1
    # the statistics matter: decoding without them is far off
    plain = Vae({"vae_scaling_factor": 1.0}).decode(Graph(folder / "vae_decoder" / "model.onnx"), latents)
    assert np.abs(plain.astype(int) - ref.astype(int)).max() > 10


@pytest.mark.parametrize("h,w", SIZES)
def test_encoder_parameters_match_vae_encode(vae, exported, h, w):
    folder, _ = exported
    pixels = _pixels(8 * h, 8 * w, seed=h + w)
    params = Graph(folder / "vae_encoder" / "model.onnx")(sample=pixels)["latent_parameters"]
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(pixels).unsqueeze(2)).latent_dist
    assert params.shape == (1, 2 * Z, h, w)
    assert np.abs(params[:, :Z] - dist.mean[:, :, 0].numpy()).max() <= ATOL
    assert np.abs(params[:, Z:] - dist.logvar[:, :, 0].numpy()).max() <= ATOL


def test_encode_normalises_as_the_img2img_pipeline(vae, exported):
    """Vae.encode against ``QwenImageImg2ImgPipeline._encode_vae_image`` itself, its posterior sampled with the
    standard-normal draw the engine makes (numpy's generator, not torch's: the draw is the engine's business)."""
    from diffusers import QwenImageImg2ImgPipeline

    folder, _ = exported
    pixels, seed = _pixels(96, 160, seed=3), 7
    ours = Vae(_config()).encode(Graph(folder / "vae_encoder" / "model.onnx"), pixels, np.random.default_rng(seed))
    noise = np.random.default_rng(seed).standard_normal((1, Z, 12, 20), dtype=np.float32)

    class Encoded:
        def __init__(self, output):
            dist = output.latent_dist
            dist.sample = lambda generator=None: dist.mean + dist.std * torch.from_numpy(noise).unsqueeze(2)
            self.latent_dist = dist

    stub = types.SimpleNamespace(vae=types.SimpleNamespace(config=vae.config, encode=lambda x: Encoded(vae.encode(x))))
    with torch.no_grad():
        ref = QwenImageImg2ImgPipeline._encode_vae_image(stub, torch.from_numpy(pixels).unsqueeze(2), None)
    assert ref.shape == (1, Z, 1, 12, 20)
    assert np.abs(ours - ref[:, :, 0].numpy()).max() <= ATOL


def test_engine_tiles_are_diffusers_qwen_tiles(exported):
    """``AutoencoderKLQwenImage.enable_tiling()`` (tiles of 256 px at a 192 px stride, shrunk here to 64 at 48 on
    both sides) is the engine's Tiling scheme: the same tiles, blends and crops, on unclamped decoder tiles."""
    folder, _ = exported
    vae = qwen_vae.tiny_vae(0)
    vae.enable_tiling(64, 64, 48, 48)
    tiling = Tiling(sample_size=64, latent_size=8)
    z = _latents(14, 20, seed=5)
    decoder = Graph(folder / "vae_decoder" / "model.onnx")
    ours = TiledDecoder(decoder, tiling).decode(z)
    x = _pixels(104, 136, seed=6)
    encoded = TiledEncoder(Graph(folder / "vae_encoder" / "model.onnx"), tiling).encode(x)
    with torch.no_grad():
        ref = vae.decode(torch.from_numpy(z).unsqueeze(2)).sample[:, :, 0].numpy()
        ref_params = vae.encode(torch.from_numpy(x).unsqueeze(2)).latent_dist.parameters[:, :, 0].numpy()
    assert ours.shape == ref.shape == (1, 3, 112, 160)
    assert np.abs(ours - ref).max() <= ATOL
    assert np.abs(ours - decoder(latent_sample=z)["sample"]).max() > 100 * ATOL  # tiles do differ from untiled
    assert encoded.shape == ref_params.shape == (1, 2 * Z, 13, 17)
    assert np.abs(encoded - ref_params).max() <= ATOL


def test_tiling_of_a_qwen_export_reads_its_vae_config(exported):
    """Without vae_* layout keys in the manifest, the layout comes from vae_decoder/config.json: Qwen's 256 px
    tiles (32 latents at scale 8) and base_dim x dim_mult channels."""
    folder, _ = exported
    manifest = types.SimpleNamespace(config={}, folder=folder)
    saved = json.loads((folder / "vae_decoder" / "config.json").read_text())
    assert saved["_class_name"] == "AutoencoderKLQwenImage"
    assert vae_layout(manifest) == {
        "sample_size": 256,
        "block_out_channels": [8, 16, 32, 32],
        "mid_block_attention": True,
    }
    assert Tiling.of(manifest) == Tiling(256, 32)


def test_config_keys_are_the_vae_s(vae, exported):
    """What main writes for this VAE: the engine's Vae, Tiling and memory layout read these as from the VAE."""
    folder, _ = exported
    keys = qwen_vae.config_keys(vae)
    assert keys["vae_latents_mean"] == vae.config.latents_mean and keys["vae_latents_std"] == vae.config.latents_std
    assert (keys["vae_scale_factor"], keys["latent_channels"]) == (8, Z)
    manifest = types.SimpleNamespace(config=keys, folder=folder)
    assert vae_layout(manifest) == vae_layout(types.SimpleNamespace(config={}, folder=folder))
    assert Tiling.of(manifest) == Tiling(256, 32)


def test_statistics_must_come_in_pairs():
    from engine.errors import EngineError

    with pytest.raises(EngineError):
        Vae({"vae_scaling_factor": 1.0, "vae_latents_mean": [0.0] * Z})
