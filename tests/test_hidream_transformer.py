"""HiDream-I1's transformer: the dense mixture-of-experts against diffusers' sparse one, the patch-token graph
(numpy patchify/unpatchify around it) against diffusers' whole forward, and its ONNX export at other sizes."""

import numpy as np
import pytest
import torch

from engine.families import hidream
from exporters.hidream import moe, transformer

# the dense form adds the experts in moe_infer's order, an unpicked one as 0 x out: equal to fp32 reordering
MOE_ATOL = 1e-6
# the whole transformer, ours (numpy patchify, dense MoE, our rotary spelling) against diffusers' forward
FORWARD_ATOL = 1e-5


def _moe_layer(seed: int, experts: int = 4, active: int = 2):
    from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU

    torch.manual_seed(seed)
    layer = MOEFeedForwardSwiGLU(dim=32, hidden_dim=128, num_routed_experts=experts, num_activated_experts=active)
    return layer.eval()


@pytest.mark.parametrize(("experts", "active"), [(4, 2), (8, 1)])
def test_dense_moe_equals_diffusers_sparse_moe(experts, active):
    layer = _moe_layer(1, experts, active)
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((3, 50, 32)).astype(np.float32))
    with torch.no_grad():
        sparse = layer(x)
        dense = moe.dense_moe_forward(layer, x)
        with moe.dense_moe():  # the patch the export runs under
            patched = layer(x)
        # a control that the comparison can fail: every expert weighted by its score, no top-k
        scores = torch.nn.functional.linear(x.reshape(-1, 32), layer.gate.weight).softmax(-1)
        everyone = sum(e(x.reshape(-1, 32)) * scores[:, i : i + 1] for i, e in enumerate(layer.experts))
        everyone = everyone.view(x.shape) + layer.shared_experts(x)
    np.testing.assert_allclose(dense.numpy(), sparse.numpy(), rtol=0, atol=MOE_ATOL)
    np.testing.assert_array_equal(patched.numpy(), dense.numpy())
    assert np.abs(everyone.numpy() - sparse.numpy()).max() > 1e-3
    assert layer.forward.__func__ is not moe.dense_moe_forward  # the patch is undone


@pytest.fixture(scope="module")
def tiny():
    return transformer.tiny_transformer(0, t5_dim=64, llama_dim=48, pooled_dim=64)


@pytest.mark.parametrize(("height", "width"), [(24, 24), (24, 16), (16, 32)])
def test_patch_token_forward_equals_diffusers(tiny, height, width):
    """The engine's patch tokens through the graph's forward equal diffusers' forward on the latents: square
    latents unpadded, non-square ones padded to max_seq with a key mask, as diffusers does."""
    rng = np.random.default_rng(height * width)
    latents = rng.standard_normal((2, 16, height, width)).astype(np.float32)
    t5 = rng.standard_normal((2, 10, 64)).astype(np.float32)
    llama = rng.standard_normal((3, 2, 7, 48)).astype(np.float32)  # the tiny's llama_layers index 3 layers
    pooled = rng.standard_normal((2, 64)).astype(np.float32)
    timesteps = np.array([937.5, 20.0], np.float32)
    with torch.no_grad():
        reference = tiny(
            hidden_states=torch.from_numpy(latents),
            timesteps=torch.from_numpy(timesteps),
            encoder_hidden_states_t5=torch.from_numpy(t5),
            encoder_hidden_states_llama3=torch.from_numpy(llama),
            pooled_embeds=torch.from_numpy(pooled),
            return_dict=False,
        )[0].numpy()
    tokens, mask, ids = hidream.patch_tokens(latents, 2, transformer.max_seq(tiny.config))  # the engine's
    assert tokens.shape[1] == (height * width // 4 if height == width else transformer.max_seq(tiny.config))
    feeds = {
        "hidden_states": tokens,
        "hidden_states_masks": mask,
        "img_ids": ids,
        "timestep": timesteps,
        "encoder_hidden_states_t5": t5,
        "encoder_hidden_states_llama3": llama,
        "pooled_embeds": pooled,
    }
    out = transformer.transformer_component(tiny).reference(feeds)["out_hidden_states"]
    ours = hidream.unpatch_tokens(out, 2, height, width)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=FORWARD_ATOL)


def test_transformer_exports_one_graph_for_every_size(exported_tiny):
    """The tiny export's transformer: traced non-square at batch 2 (max_seq tokens), validated square at two other
    token counts and batches, its image-token axis symbolic (the manifest records what was validated)."""
    import json

    folder = exported_tiny("hidream-i1", weights="fp32", text_encoder_weights="fp32")
    entry = json.loads((folder / "stepwise.json").read_text())["components"]["transformer"]
    result = entry["validation"]
    assert result["max_abs_diff"] <= result["tolerance"]
    assert {tuple(s["hidden_states"]) for s in result["shapes"]} == {(1, 144, 64), (2, 64, 64)}
    assert entry["inputs"]["hidden_states"]["shape"] == ["batch_size", "image_tokens", 64]


def test_reduced_depth_plan_keeps_each_blocks_llama_layer_and_projection():
    """Validation at reduced depth (a 17B transformer is not held in PyTorch) keeps the first double- and the
    first single-stream block: each must read the Llama layer and caption projection it reads in the full model,
    and T5's projection stays the last."""
    from exporters import reduced

    full = transformer.tiny_transformer(0, t5_dim=64, llama_dim=48, pooled_dim=64)
    full.register_to_config(num_layers=3, num_single_layers=2, llama_layers=[4, 3, 2, 1, 0])
    config, remap, what = reduced.hidream_plan(full)
    assert (config["num_layers"], config["num_single_layers"]) == (1, 1)
    assert config["llama_layers"] == [4, 1]  # block 0 and block 3 (the first single-stream one)
    assert remap("caption_projection.0.linear.weight") == "caption_projection.0.linear.weight"
    assert remap("caption_projection.1.linear.weight") == "caption_projection.3.linear.weight"
    assert remap("caption_projection.2.linear.weight") == "caption_projection.5.linear.weight"  # T5's
    assert remap("single_stream_blocks.0.block.attn1.to_q.weight") == "single_stream_blocks.0.block.attn1.to_q.weight"
    assert "double_stream_blocks [0] of 3" in what and "single_stream_blocks [0] of 2" in what
