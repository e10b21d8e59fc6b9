"""bench.sdcpp's diffusers → original-layout transformer rewrite, checked against diffusers' own converter the
other way: convert_flux_transformer_checkpoint_to_diffusers / convert_sd3_transformer_checkpoint_to_diffusers
of what bench.sdcpp writes gives back the diffusers state dict, tensor for tensor, bit for bit."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from bench import sdcpp  # noqa: E402


def _diffusers_state(module, width: int | None) -> dict:
    """Random bf16 values in the module's state-dict names; with ``width``, every tensor keeps its dim 0 and
    has the rest cut to ``width`` (the conversions only cut and join along dim 0)."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, t in module.state_dict().items():
        shape = tuple(t.shape) if width is None or t.dim() < 2 else (t.shape[0], *([width] * (t.dim() - 1)))
        state[name] = torch.randn(shape, generator=gen).to(torch.bfloat16)
    return state


def _roundtrip(tmp_path, state: dict, kind: str, back) -> None:
    names = sorted(state)
    half = len(names) // 2
    for i, part in enumerate((names[:half], names[half:])):  # two shards, as save_pretrained writes big models
        safetensors_torch.save_file(
            {n: state[n].contiguous() for n in part}, str(tmp_path / f"diffusion_pytorch_model-{i}.safetensors")
        )
    tensors = sdcpp.component_tensors(tmp_path)
    plan = sdcpp.transformer_plan(kind, tensors)
    out = tmp_path / "original.safetensors"
    sdcpp.write_safetensors(out, plan, tensors)
    original = safetensors_torch.load_file(str(out))
    assert len(original) == len(plan)
    again = back(dict(original))
    assert sorted(again) == names
    for name in names:
        assert again[name].dtype == state[name].dtype, name
        assert torch.equal(again[name], state[name]), name


@pytest.mark.parametrize("guidance", [False, True])  # schnell, dev
def test_flux_layout_roundtrip(tmp_path, guidance):
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.device("meta"):  # diffusers' converter assumes FLUX.1's 3072 width: full width, dims > 0 cut
        model = diffusers.FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=guidance)
    state = _diffusers_state(model, width=3)
    _roundtrip(tmp_path, state, "FluxPipeline", convert_flux_transformer_checkpoint_to_diffusers)
    names = {n for n, _ in sdcpp.flux_plan(state)}
    assert "double_blocks.1.img_attn.qkv.weight" in names and "single_blocks.1.linear1.bias" in names
    assert ("guidance_in.in_layer.weight" in names) == guidance


@pytest.mark.parametrize("qk_norm,dual", [(None, ()), ("rms_norm", ()), ("rms_norm", (0,))])  # 3, 3.5 L, 3.5 M
def test_sd3_layout_roundtrip(tmp_path, qk_norm, dual):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    model = diffusers.SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=24,
        caption_projection_dim=32,
        pooled_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=16,
        qk_norm=qk_norm,
        dual_attention_layers=dual,
    )
    state = _diffusers_state(model, width=None)
    _roundtrip(tmp_path, state, "StableDiffusion3Pipeline", convert_sd3_transformer_checkpoint_to_diffusers)


def test_sd3_reduced_depth_is_refused():
    def t(shape):
        return sdcpp.Tensor(None, "BF16", shape, 0, 0)

    full = {"context_embedder.weight": t((2432, 4096))} | {
        f"transformer_blocks.{i}.attn.to_q.weight": t((2432, 2432)) for i in range(38)
    }
    assert sdcpp.sdcpp_refusal("StableDiffusion3Pipeline", full) is None
    reduced = {k: v for k, v in full.items() if not k.startswith("transformer_blocks.") or ".0." in k}
    assert "64 × max(24, blocks)" in sdcpp.sdcpp_refusal("StableDiffusion3Pipeline", reduced)
    assert sdcpp.sdcpp_refusal("FluxPipeline", reduced) is None


# --- Qwen-Image ---------------------------------------------------------------------------------------------
# stable-diffusion.cpp's WAN::WanVAE (wan.hpp at 90e87bc8, the sources stable-diffusion-cpp-python 0.4.7
# vendors) for Wan 2.1 / Qwen-Image: dim_mult (1, 2, 4, 4), 2 residual blocks a level, temporal down (F, T, T),
# up (T, T, F). Written from its constructors, block by block, not from bench.sdcpp's rename.
_WAN_ENCODER = {  # Encoder3d: per level 2 ResidualBlocks, then a Resample but after the last level
    0: "res", 1: "res", 2: "downsample2d",
    3: "res+shortcut", 4: "res", 5: "downsample3d",  # 96 → 192
    6: "res+shortcut", 7: "res", 8: "downsample3d",  # 192 → 384
    9: "res", 10: "res",
}  # fmt: skip
_WAN_DECODER = {  # Decoder3d: per level 3 ResidualBlocks, then a Resample but after the last level
    0: "res", 1: "res", 2: "res", 3: "upsample3d",
    4: "res+shortcut", 5: "res", 6: "res", 7: "upsample3d",  # 192 (halved by the upsample) → 384
    8: "res", 9: "res", 10: "res", 11: "upsample2d",
    12: "res", 13: "res", 14: "res",
}  # fmt: skip
_WAN_PARAMS = {
    # ResidualBlock: residual.0 RMS_norm, .2 CausalConv3d, .3 RMS_norm, .6 CausalConv3d; shortcut if in != out
    "res": ["residual.0.gamma", "residual.2.weight", "residual.2.bias", "residual.3.gamma"]
    + ["residual.6.weight", "residual.6.bias"],
    "attn": ["norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias"],  # AttentionBlock
    # Resample: resample.1 Conv2d; time_conv CausalConv3d for the 3-D modes
    "downsample2d": ["resample.1.weight", "resample.1.bias"],
    "upsample2d": ["resample.1.weight", "resample.1.bias"],
    "downsample3d": ["resample.1.weight", "resample.1.bias", "time_conv.weight", "time_conv.bias"],
    "upsample3d": ["resample.1.weight", "resample.1.bias", "time_conv.weight", "time_conv.bias"],
}
_WAN_PARAMS["res+shortcut"] = [*_WAN_PARAMS["res"], "shortcut.weight", "shortcut.bias"]


def _wan_vae_names() -> set[str]:
    names = {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"}  # WanVAE: after the encoder, before
    for side, blocks, group in (("encoder", _WAN_ENCODER, "downsamples"), ("decoder", _WAN_DECODER, "upsamples")):
        names |= {f"{side}.conv1.weight", f"{side}.conv1.bias", f"{side}.head.0.gamma"}
        names |= {f"{side}.head.2.weight", f"{side}.head.2.bias"}  # head.1 is the SiLU
        for i, kind in (("0", "res"), ("1", "attn"), ("2", "res")):
            names |= {f"{side}.middle.{i}.{p}" for p in _WAN_PARAMS[kind]}
        for i, kind in blocks.items():
            names |= {f"{side}.{group}.{i}.{p}" for p in _WAN_PARAMS[kind]}
    return names


def test_qwen_vae_names_are_stable_diffusion_cpps_wan_vae():
    """A tiny AutoencoderKLQwenImage (narrow, but Wan's levels and blocks) renamed: exactly the parameters
    stable-diffusion.cpp's WanVAE declares, one to one, shapes kept where the two must agree."""
    with torch.device("meta"):
        vae = diffusers.AutoencoderKLQwenImage(base_dim=8, z_dim=4)
    shapes = {n: tuple(t.shape) for n, t in vae.state_dict().items()}
    renamed = sdcpp.qwen_vae_names(shapes)
    assert set(renamed) == set(shapes)
    assert sorted(renamed.values()) == sorted(_wan_vae_names())
    wan = {renamed[n]: s for n, s in shapes.items()}
    # spot checks against wan.hpp's constructors (widths 8 · dim_mult here, 96 · dim_mult there)
    assert wan["decoder.upsamples.3.time_conv.weight"] == (64, 32, 3, 1, 1)  # CausalConv3d(dim, dim * 2, (3,1,1))
    assert wan["decoder.upsamples.11.resample.1.weight"] == (8, 16, 3, 3)  # Conv2d(dim, dim / 2, 3×3)
    assert wan["encoder.downsamples.5.time_conv.weight"] == (16, 16, 3, 1, 1)  # CausalConv3d(dim, dim, (3,1,1))
    assert wan["decoder.upsamples.4.shortcut.weight"] == (32, 16, 1, 1, 1)  # in_dim halved after the upsample
    assert wan["encoder.head.2.weight"][0] == 8 and wan["conv1.weight"][:2] == (8, 8)  # z_dim * 2
    assert wan["decoder.conv1.weight"][:2] == (32, 4) and wan["conv2.weight"][:2] == (4, 4)
    assert wan["decoder.middle.1.norm.gamma"] == (32, 1, 1) and wan["decoder.head.0.gamma"] == (8, 1, 1, 1)
    with pytest.raises(ValueError, match="no place"):
        sdcpp.qwen_vae_names(["decoder.mid_block.resnets.2.conv1.weight"])


def test_qwen_components_go_to_stable_diffusion_cpp_as_planned():
    names = ["img_in.weight", "transformer_blocks.0.img_mod.1.weight", "norm_out.linear.weight"]
    assert sdcpp.transformer_plan("QwenImagePipeline", names) == [(n, [(n, None)]) for n in names]
    text = ["lm_head.weight", "model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight"]
    text += ["visual.blocks.0.attn.qkv.weight", "visual.merger.mlp.0.weight"]
    plan = sdcpp.component_plan("QwenImagePipeline", "llm", text)
    assert [n for n, _ in plan] == [
        "model.embed_tokens.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.norm.weight",
    ]
    vae = sdcpp.component_plan("QwenImagePipeline", "vae", ["post_quant_conv.weight", "decoder.norm_out.gamma"])
    assert vae == [
        ("decoder.head.0.gamma", [("decoder.norm_out.gamma", None)]),
        ("conv2.weight", [("post_quant_conv.weight", None)]),
    ]
    assert sdcpp.component_plan("FluxPipeline", "t5", text) is None


def test_qwen_narrow_widths_are_refused():
    def t(*shape):
        return sdcpp.Tensor(None, "BF16", shape, 0, 0)

    full = {
        "diffusion": {"img_in.weight": t(3072, 64), "txt_in.weight": t(3072, 3584)},
        "llm": {
            "model.embed_tokens.weight": t(152064, 3584),
            "model.layers.0.self_attn.q_proj.weight": t(3584, 3584),
            "model.layers.0.self_attn.k_proj.weight": t(512, 3584),
        },
        "vae": {
            "decoder.conv_in.weight": t(384, 16, 3, 3, 3),
            "decoder.up_blocks.0.resnets.2.conv1.weight": t(384, 384, 3, 3, 3),
        },
    }
    for role, tensors in full.items():
        assert sdcpp.sdcpp_refusal("QwenImagePipeline", tensors, role) is None, role
    narrow = {  # tests/test_random_weights.py's tinyqwen
        "diffusion": {"img_in.weight": t(32, 64), "txt_in.weight": t(32, 64)},
        "llm": {
            "model.embed_tokens.weight": t(512, 64),
            "model.layers.0.self_attn.q_proj.weight": t(64, 64),
            "model.layers.0.self_attn.k_proj.weight": t(32, 64),
        },
        "vae": {"decoder.conv_in.weight": t(64, 16, 3, 3, 3), "decoder.up_blocks.0.resnets.1.conv1.weight": t(1)},
    }
    assert "24 heads × 128" in sdcpp.sdcpp_refusal("QwenImagePipeline", narrow["diffusion"], "diffusion")
    assert "151645" in sdcpp.sdcpp_refusal("QwenImagePipeline", narrow["llm"], "llm")
    wide_vocab = {**narrow["llm"], "model.embed_tokens.weight": t(152064, 64)}
    assert "28 query / 4 key-value heads" in sdcpp.sdcpp_refusal("QwenImagePipeline", wide_vocab, "llm")
    assert "96 wide" in sdcpp.sdcpp_refusal("QwenImagePipeline", narrow["vae"], "vae")


@pytest.mark.parametrize("size", [256, 512, 1024, 1328])
def test_qwen_flow_shift_is_diffusers_dynamic_shift(size):
    """stable-diffusion.cpp's σ' = s·σ / (1 + (s − 1)·σ) with s = qwen_flow_shift equals diffusers' sigmas for
    QwenImagePipeline at that size (shift_terminal left out: no counterpart in stable-diffusion.cpp)."""
    import numpy as np
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    from bench import random_model

    config = {k: v for k, v in random_model.config("qwen-image")["scheduler"].items() if not k.startswith("_")}
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config({**config, "shift_terminal": None})
    tokens = (size // 16) ** 2
    mu = calculate_shift(
        tokens, config["base_image_seq_len"], config["max_image_seq_len"], config["base_shift"], config["max_shift"]
    )
    sigmas = np.linspace(1.0, 1 / 8, 8)
    scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    s = sdcpp.qwen_flow_shift(config, size, size)
    np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), s * sigmas / (1 + (s - 1) * sigmas), rtol=1e-5)
