"""The Qwen-Image engine family against diffusers 0.39's own code (not numbers our code produced): the rotary
tables against QwenEmbedRope, the 2x2 packing against QwenImagePipeline._pack_latents/_unpack_latents, the
schedule against FlowMatchEulerDiscreteScheduler + retrieve_timesteps as the pipeline calls them, the guidance
against the pipeline's torch expressions, and the whole loop against QwenImagePipeline.__call__ with the
transformer replaced by one function (numpy for us, torch for diffusers) and the text encoder by fixed states.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope  # noqa: E402
from diffusers.pipelines.qwenimage import pipeline_qwenimage  # noqa: E402

import schedulers  # noqa: E402
from engine import sampling  # noqa: E402
from engine.families import ARCHITECTURES, qwen_image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = json.loads((ROOT / "registry" / "models.json").read_text())
QWEN_SCHEDULER = next(m["scheduler"] for m in REGISTRY["models"] if m["id"] == "qwen-image")
Pipe = pipeline_qwenimage.QwenImagePipeline

CONFIG = {
    "vae_scale_factor": 8,
    "latent_channels": 16,
    "in_channels": 64,
    "timestep_scale": 0.001,
    "timestep_shape": "batch",
    "axes_dims_rope": [16, 56, 56],
    "rope_theta": 10000,
    "scale_rope": True,
    "prompt_template": qwen_image.PROMPT_TEMPLATE,
    "prompt_template_start_idx": 34,
    "pipeline_tokenizer_max_length": 1024,
    "max_sequence_length": 512,
}


def arch(**config):
    return ARCHITECTURES["qwen-image"](SimpleNamespace(config={**CONFIG, **config}))


# --- (a) rotary tables


@pytest.mark.parametrize("axes", [[16, 56, 56], [2, 4, 2]])
@pytest.mark.parametrize("height, width", [(64, 64), (48, 80), (3, 5), (1, 1)])
@pytest.mark.parametrize("text_len", [7, 300])
def test_rotary_tables_match_qwen_embed_rope(axes, height, width, text_len):
    rope = QwenEmbedRope(theta=10000, axes_dim=axes, scale_rope=True)
    img, txt = rope([(1, height, width)], max_txt_seq_len=text_len, device=torch.device("cpu"))
    ours = qwen_image.rotary_tables(height, width, text_len, axes, 10000, True)
    for name, ref in (("img", img), ("txt", txt)):
        ref = ref.numpy()
        cos, sin = ours[f"{name}_freqs_cos"], ours[f"{name}_freqs_sin"]
        assert cos.dtype == sin.dtype == np.float32
        assert cos.shape == sin.shape == ref.shape
        np.testing.assert_allclose(cos, ref.real, rtol=0, atol=1e-7)
        np.testing.assert_allclose(sin, ref.imag, rtol=0, atol=1e-7)


def test_rotary_angles_are_torch_float32_to_the_bit():
    """The angles before cos/sin: torch's float32 outer product of the index and the inverse frequencies."""
    index = torch.arange(-4096, 4096)
    for theta in (10000, 256):
        for dim in (2, 4, 16, 56, 128):
            inverse = 1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float32).div(dim))
            ref = torch.outer(index, inverse).numpy()
            assert np.array_equal(qwen_image.rope_angles(index.numpy(), dim, theta), ref)


def test_rotary_without_scale_rope_matches():
    rope = QwenEmbedRope(theta=10000, axes_dim=[16, 56, 56], scale_rope=False)
    img, txt = rope([(1, 6, 10)], max_txt_seq_len=11, device=torch.device("cpu"))
    ours = qwen_image.rotary_tables(6, 10, 11, [16, 56, 56], 10000, False)
    np.testing.assert_allclose(ours["img_freqs_cos"], img.numpy().real, rtol=0, atol=1e-7)
    np.testing.assert_allclose(ours["txt_freqs_sin"], txt.numpy().imag, rtol=0, atol=1e-7)


def test_prepare_feeds_each_text_its_own_table():
    """The transformer's txt tables follow each text's length; the packed grid is (H//16, W//16)."""
    a = arch()
    cond = {"embeds": np.zeros((1, 9, 8), np.float32), "negative_embeds": np.zeros((1, 4, 8), np.float32)}
    extra = a.prepare(cond, 128, 96, 4.0)
    assert extra["cond"]["img_freqs_cos"].shape == (6 * 8, 64)
    assert extra["cond"]["txt_freqs_cos"].shape == (9, 64)
    assert extra["uncond"]["txt_freqs_sin"].shape == (4, 64)
    rope = QwenEmbedRope(theta=10000, axes_dim=[16, 56, 56], scale_rope=True)
    _, txt = rope([(1, 6, 8)], max_txt_seq_len=4, device=torch.device("cpu"))
    np.testing.assert_allclose(extra["uncond"]["txt_freqs_cos"], txt.numpy().real, rtol=0, atol=1e-7)
    assert "uncond" not in a.prepare({"embeds": cond["embeds"]}, 128, 96, 1.0)


# --- (b) latents


@pytest.mark.parametrize("width, height", [(64, 64), (96, 48), (1024, 1024), (1328, 800), (100, 70)])
def test_pack_unpack_match_pipeline(width, height):
    a = arch()
    assert a.image_scale_factor == 16
    shape = a.latent_shape(width, height)
    assert shape == (1, 16, 2 * (height // 16), 2 * (width // 16))
    noise = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    _, c, h, w = shape
    ref = Pipe._pack_latents(torch.from_numpy(noise), 1, c, h, w).numpy()
    packed = a.pack(noise)
    assert np.array_equal(packed, ref)
    unpacked = Pipe._unpack_latents(torch.from_numpy(ref), height, width, 8).numpy()  # (1, C, 1, h, w)
    assert np.array_equal(a.unpack(packed, width, height), unpacked[:, :, 0])


def test_noise_is_the_pipelines_draw_with_one_frame():
    """prepare_latents draws (1, 1, C, h, w) and packs it; the same values drawn as (1, C, h, w) pack alike."""
    a = arch()
    shape = a.latent_shape(96, 64)
    pipe = SimpleNamespace(vae_scale_factor=8, _pack_latents=Pipe._pack_latents)
    generator = torch.Generator().manual_seed(3)
    ref = Pipe.prepare_latents(pipe, 1, 16, 64, 96, torch.float32, "cpu", generator).numpy()
    noise = torch.randn((1, 1, *shape[1:]), generator=torch.Generator().manual_seed(3)).numpy()[:, 0]
    assert np.array_equal(a.pack(noise), ref)


# --- (c) schedule


@pytest.mark.parametrize("width, height", [(1024, 1024), (1328, 752), (64, 48)])
@pytest.mark.parametrize("steps", [28, 4])
def test_schedule_matches_pipeline(width, height, steps):
    a = arch()
    ours = schedulers.from_config(dict(QWEN_SCHEDULER))
    a.set_timesteps(ours, steps, width, height)

    ref = diffusers.FlowMatchEulerDiscreteScheduler.from_config(dict(QWEN_SCHEDULER))
    image_seq_len = (height // 16) * (width // 16)  # latents.shape[1] after packing
    mu = pipeline_qwenimage.calculate_shift(
        image_seq_len,
        ref.config.get("base_image_seq_len", 256),
        ref.config.get("max_image_seq_len", 4096),
        ref.config.get("base_shift", 0.5),
        ref.config.get("max_shift", 1.15),
    )
    sigmas = np.linspace(1.0, 1 / steps, steps)
    timesteps, _ = pipeline_qwenimage.retrieve_timesteps(ref, steps, "cpu", sigmas=sigmas, mu=mu)
    np.testing.assert_array_equal(np.asarray(ours.timesteps), timesteps.numpy())
    np.testing.assert_array_equal(np.asarray(ours.sigmas), ref.sigmas.numpy())
    # the transformer's timestep input: t.expand(1).to(float32) / 1000
    for t_ours, t_ref in zip(ours.timesteps, timesteps, strict=True):
        assert a.timestep(t_ours, 1).tolist() == (t_ref.expand(1).to(torch.float32) / 1000).tolist()


# --- (d) guidance


@pytest.mark.parametrize("scale", [4.0, 1.5, 7.25])
def test_true_cfg_matches_pipeline(scale):
    rng = np.random.default_rng(1)
    cond = rng.standard_normal((1, 48, 64), dtype=np.float32)
    uncond = rng.standard_normal((1, 48, 64), dtype=np.float32)
    noise_pred, neg_noise_pred = torch.from_numpy(cond), torch.from_numpy(uncond)
    comb_pred = neg_noise_pred + scale * (noise_pred - neg_noise_pred)
    cond_norm = torch.norm(noise_pred, dim=-1, keepdim=True)
    noise_norm = torch.norm(comb_pred, dim=-1, keepdim=True)
    ref = (comb_pred * (cond_norm / noise_norm)).numpy()
    ours = qwen_image.true_cfg(cond, uncond, scale)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=1e-7)


def test_negative_prompt_defaults_to_a_space_with_cfg():
    a = arch()
    assert a.negative_prompt_used("", 4.0) == " "
    assert a.negative_prompt_used("blurry", 4.0) == "blurry"
    assert a.negative_prompt_used("", 1.0) == ""
    assert a.components == {"text_encoder": True, "transformer": True}
    assert a.denoiser_component == "transformer"
    assert a.tokenizer_lengths() == {"tokenizer": 1024 + 34}
    assert a.denoiser_batch(4.0) == a.denoiser_batch(None) == 1


# --- encode: each text alone through QwenTextEncoder


class FakeQwenEncoder:
    """Stands in for engine.text_encoders.QwenTextEncoder: one (1, len(text), 8) state per text."""

    calls: list = []

    def __init__(self, graph, tokenizer, template, drop, max_sequence_length):
        FakeQwenEncoder.calls.append(("init", template, drop, max_sequence_length))
        # what a truncation warning reads of the real encoder: its tokenizer's name and the prompt's window
        self.tokenizer, self.max_length = SimpleNamespace(name="tokenizer"), max_sequence_length

    def __call__(self, text):
        FakeQwenEncoder.calls.append(("encode", text))
        states = np.full((1, len(text), 8), float(len(text)), np.float32)
        return SimpleNamespace(last_hidden=states, truncated=len(text) > 20)


def test_encode_runs_prompt_then_negative_alone(monkeypatch):
    import engine.text_encoders

    monkeypatch.setattr(engine.text_encoders, "QwenTextEncoder", FakeQwenEncoder, raising=False)
    FakeQwenEncoder.calls = []
    a = arch()
    cond, warnings = a.encode({"text_encoder": None}, {"tokenizer": None}, "a cat", "", 4.0)
    assert FakeQwenEncoder.calls == [
        ("init", qwen_image.PROMPT_TEMPLATE, 34, 512),
        ("encode", "a cat"),
        ("encode", " "),
    ]
    assert cond["embeds"].shape == (1, 5, 8) and cond["negative_embeds"].shape == (1, 1, 8)
    assert warnings == []
    FakeQwenEncoder.calls = []
    cond, warnings = a.encode({"text_encoder": None}, {"tokenizer": None}, "x" * 30, "ignored", 1.0)
    assert [c for c in FakeQwenEncoder.calls if c[0] == "encode"] == [("encode", "x" * 30)]
    assert set(cond) == {"embeds"} and len(warnings) == 1 and "512-token" in warnings[0]


# --- (e) the whole loop against QwenImagePipeline.__call__ with a stand-in transformer


def _weights(channels: int, text_dim: int, rot: int):
    rng = np.random.default_rng(7)
    return {
        "w": rng.standard_normal((channels, channels), dtype=np.float32) * np.float32(0.1),
        "u": rng.standard_normal((text_dim, channels), dtype=np.float32) * np.float32(0.1),
        "r": rng.standard_normal((rot, channels), dtype=np.float32) * np.float32(0.1),
    }


def numpy_transformer(weights, calls):
    """A stand-in graph: mixes the latents, the timestep, the text (its mean) and both rotary tables."""

    def graph(outputs, hidden_states, timestep, encoder_hidden_states, **rotary):
        calls.append({"batch": hidden_states.shape[0], "text": encoder_hidden_states.shape[1], **rotary})
        text = encoder_hidden_states.mean(axis=1, keepdims=True) @ weights["u"]
        img_rot = (rotary["img_freqs_cos"] + rotary["img_freqs_sin"]) @ weights["r"]
        txt_rot = (rotary["txt_freqs_cos"] - rotary["txt_freqs_sin"]).mean(axis=0) @ weights["r"]
        out = np.tanh(hidden_states @ weights["w"]) * timestep[:, None, None] + text + img_rot[None] + txt_rot
        return {outputs[0]: out.astype(np.float32)}

    return graph


class TorchTransformer(torch.nn.Module):
    """The same function in torch, taking what QwenImagePipeline passes its transformer."""

    def __init__(self, weights, in_channels):
        super().__init__()
        self.w = {k: torch.from_numpy(v) for k, v in weights.items()}
        self.rope = QwenEmbedRope(theta=10000, axes_dim=[16, 56, 56], scale_rope=True)
        self.config = SimpleNamespace(in_channels=in_channels, guidance_embeds=False)
        self.dtype, self.device = torch.float32, torch.device("cpu")

    def cache_context(self, name):
        import contextlib

        return contextlib.nullcontext()

    def forward(self, hidden_states, timestep, guidance, encoder_hidden_states_mask, encoder_hidden_states, **kw):
        assert encoder_hidden_states_mask is None
        img, txt = self.rope(kw["img_shapes"], max_txt_seq_len=encoder_hidden_states.shape[1], device="cpu")
        text = encoder_hidden_states.mean(dim=1, keepdim=True) @ self.w["u"]
        img_rot = (img.real + img.imag) @ self.w["r"]
        txt_rot = (txt.real - txt.imag).mean(dim=0) @ self.w["r"]
        out = torch.tanh(hidden_states @ self.w["w"]) * timestep[:, None, None] + text + img_rot[None] + txt_rot
        return (out,)


@pytest.mark.parametrize("width, height, guidance", [(128, 128, 4.0), (160, 96, 2.5), (96, 64, 1.0)])
def test_whole_loop_matches_pipeline(width, height, guidance):
    a = arch()
    steps, text_dim = 4, 8
    weights = _weights(64, text_dim, 64)
    rng = np.random.default_rng(11)
    embeds = rng.standard_normal((1, 9, text_dim), dtype=np.float32)
    negative = rng.standard_normal((1, 4, text_dim), dtype=np.float32)
    cond = {"embeds": embeds}
    if a.uses_cfg(guidance):
        cond["negative_embeds"] = negative
    noise = rng.standard_normal(a.latent_shape(width, height), dtype=np.float32)

    sched = schedulers.from_config(dict(QWEN_SCHEDULER))
    a.set_timesteps(sched, steps, width, height)
    calls: list = []
    denoise = a.denoiser(numpy_transformer(weights, calls), cond, a.prepare(cond, width, height, guidance), guidance)
    ours = a.unpack(sampling.sample(denoise, sched, a.pack(noise)).latents, width, height)
    runs = 2 if a.uses_cfg(guidance) else 1
    assert len(calls) == steps * runs
    assert [c["text"] for c in calls[:runs]] == [9, 4][:runs]  # the prompt first, batch 1 each
    assert all(c["batch"] == 1 for c in calls)

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(dict(QWEN_SCHEDULER))
    pipe = Pipe(scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=TorchTransformer(weights, 64))
    pipe.set_progress_bar_config(disable=True)
    captured = {}

    def keep(_pipe, i, t, kwargs):
        captured["latents"] = kwargs["latents"]
        return {}

    with torch.no_grad():
        pipe(
            prompt_embeds=torch.from_numpy(embeds),
            negative_prompt_embeds=torch.from_numpy(negative) if a.uses_cfg(guidance) else None,
            true_cfg_scale=guidance,
            width=width,
            height=height,
            num_inference_steps=steps,
            latents=torch.from_numpy(a.pack(noise)),
            output_type="latent",
            callback_on_step_end=keep,
        )
    ref = Pipe._unpack_latents(captured["latents"], height, width, 8).numpy()[:, :, 0]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)  # |latents| ~5; seen: 2e-6
