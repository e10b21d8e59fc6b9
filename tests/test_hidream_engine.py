"""HiDream-I1's engine against diffusers 0.39's HiDreamImagePipeline on the tiny pipeline: same weights, same
initial latents → the same image within 2/255 per channel. Full with CFG (flow UniPC), Dev and Fast without
(flow-match Euler at their shifts; the same tiny weights, the scheduler is what differs), square and non-square
(a non-square latent is padded to max_seq tokens, as diffusers pads it). Also the numpy patchify against
diffusers' own ``patchify``/``unpatchify`` and the size rescale against the pipeline's arithmetic."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import engine  # noqa: E402
import registry  # noqa: E402
from engine.families import hidream  # noqa: E402
from exporters import tiny  # noqa: E402

MAX_PIXEL_DIFF = 2
PROMPT = "a cat holding a sign that says hello"


@pytest.fixture(scope="module")
def reference():
    return tiny.build("hidream-i1")


@pytest.fixture(scope="module")
def folder(exported_tiny, tmp_path_factory):
    """The tiny export, and copies of it carrying Dev's and Fast's scheduler configs."""
    full = exported_tiny("hidream-i1", weights="fp32", text_encoder_weights="fp32")
    folders = {"hidream-i1": full}
    for model_id in ("hidream-i1-dev", "hidream-i1-fast"):
        copy = tmp_path_factory.mktemp(model_id) / "export"
        shutil.copytree(full, copy)
        config = registry.get(model_id).scheduler
        (copy / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
        folders[model_id] = copy
    return folders


@pytest.mark.parametrize(("height", "width"), [(16, 16), (16, 24), (12, 20)])
def test_patch_tokens_match_diffusers_patchify(reference, height, width):
    model = reference.transformer
    latents = np.random.default_rng(height + width).standard_normal((2, 16, height, width), dtype=np.float32)
    max_seq = model.max_seq
    tokens, mask, ids = hidream.patch_tokens(latents, 2, max_seq)
    ref_tokens, ref_mask, _, ref_ids = model.patchify(torch.from_numpy(latents))
    np.testing.assert_array_equal(tokens, ref_tokens.numpy())
    np.testing.assert_array_equal(ids, ref_ids[0].numpy())
    if height == width:
        assert ref_mask is None and mask.min() == 1.0  # all ones: keys multiplied by 1, as diffusers' None
    else:
        np.testing.assert_array_equal(mask, ref_mask.numpy())
    out = np.random.default_rng(1).standard_normal(tokens.shape, dtype=np.float32)
    sizes = [(height // 2, width // 2)] * 2
    expected = model.unpatchify(torch.from_numpy(out), sizes, False).numpy()
    np.testing.assert_array_equal(hidream.unpatch_tokens(out, 2, height, width), expected)


@pytest.mark.parametrize(("width", "height"), [(1024, 1024), (512, 512), (1344, 768), (800, 1333), (100, 70)])
def test_image_size_is_the_pipelines_rescale(width, height):
    """HiDreamImagePipeline.__call__'s first lines (vae_scale_factor 8, default_sample_size 128): every request
    becomes ~1024² pixels."""
    import math

    division, area = 16, (128 * 8) ** 2
    scale = math.sqrt(area / (width * height))
    expected = int(width * scale // division * division), int(height * scale // division * division)
    config = {"vae_scale_factor": 8, "latent_channels": 16, "max_seq": 4096, "llama_states": 32}
    arch = hidream.HiDreamArchitecture(type("M", (), {"config": config})())
    assert arch.image_size(width, height) == expected


def _reference_image(pipe, scheduler_model: str, latents, **kwargs):
    import diffusers as d

    config = dict(registry.get(scheduler_model).scheduler)
    pipe.scheduler = getattr(d, config.pop("_class_name")).from_config(config)
    with torch.no_grad():
        image = pipe(PROMPT, latents=torch.from_numpy(latents), output_type="np", **kwargs).images[0]
    return (image * 255).round().astype(np.uint8)


@pytest.mark.parametrize(
    ("model_id", "guidance", "steps", "width", "height"),
    [
        ("hidream-i1", 5.0, 3, 32, 32),  # Full: CFG, flow UniPC
        ("hidream-i1", 5.0, 2, 40, 24),  # non-square: padded to max_seq tokens with a key mask
        ("hidream-i1-dev", 0.0, 3, 32, 32),  # Dev: no CFG, flow-match Euler shift 6
        ("hidream-i1-fast", 0.0, 3, 40, 24),  # Fast: no CFG, shift 3, non-square
    ],
)
def test_engine_matches_hidream_pipeline(folder, reference, model_id, guidance, steps, width, height):
    pipe = engine.load_pipeline(folder[model_id], threads=1)
    w, h = pipe.family.image_size(width, height)
    noise = np.random.default_rng(7).standard_normal(pipe.family.latent_shape(w, h), dtype=np.float32)
    result = pipe.generate(
        prompt=PROMPT, steps=steps, guidance=guidance, width=width, height=height, seed=0, latents=noise
    )
    expected = _reference_image(
        reference, model_id, noise, num_inference_steps=steps, guidance_scale=guidance, width=width, height=height
    )
    ours = result.image
    assert ours.shape == expected.shape == (h, w, 3)
    diff = np.abs(ours.astype(int) - expected.astype(int)).max()
    assert diff <= MAX_PIXEL_DIFF, f"max pixel difference {diff}/255"
    assert expected.std() > 5  # a flat image would match anything flat


def test_t5_cannot_be_left_out(folder):
    """--no-t5 is SD 3's (zeros in T5's place); HiDream's transformer reads T5's states: refused, one line."""
    with pytest.raises(engine.EngineError, match="cannot run without its text_encoder_3"):
        engine.load_pipeline(folder["hidream-i1"], threads=1, skip=("text_encoder_3",))


def test_memory_estimate_counts_the_padded_tokens_of_a_non_square_latent():
    """diffusers pads a non-square latent to max_seq tokens (4096 at full size): 1344x768 costs what 1024² does."""
    from types import SimpleNamespace

    from engine import memory

    layout = {"stride": 2, "heads": 20, "joint_tokens": 384, "width": 2560}
    manifest = SimpleNamespace(
        config={"vae_scale_factor": 8, "denoiser_attention": layout, "max_seq": 4096},
        components={"transformer": {"fusion": {"multi_head_attention": 48}}},
    )
    square = memory.activation_mb(manifest, "transformer", 1024, 1024, batch=2)
    assert memory.activation_mb(manifest, "transformer", 1344, 768, batch=2) == square  # 84x48 tokens padded
    assert memory.activation_mb(manifest, "transformer", 512, 512, batch=2) < square  # square: its own tokens
