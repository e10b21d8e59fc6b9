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
