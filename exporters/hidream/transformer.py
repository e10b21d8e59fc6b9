"""HiDream-I1's sparse MMDiT (``HiDreamImageTransformer2DModel``) as one ONNX graph, every image size.

Three things in diffusers' forward do not trace, and the graph leaves them to the engine or rewrites them:
- the mixture-of-experts routing (``moe_infer``: ``bincount().numpy()``) runs in its dense form (moe.py);
- ``patchify`` branches on ``height != width`` (a non-square latent is zero-padded to ``max_seq`` tokens with
  a key mask) and ``unpatchify`` loops over Python sizes: the graph takes the patch tokens, the key mask and the
  tokens' (0, row, col) ids, and returns the patch tokens; the engine patchifies, pads and unpatchifies in numpy
  exactly as diffusers does (engine/families/hidream.py);
- everything else is diffusers' own forward, inlined below without the Python-side branches.
A square latent runs with an all-ones mask, which multiplies the keys by 1: the same numbers as diffusers' ``None``.
"""

from __future__ import annotations

import numpy as np

from ..components import Component, _randn, _stable_seed, _wrapper
from .moe import dense_moe

# (batch, latent height, latent width) per case: the trace is non-square (padded to max_seq tokens, batch 2), the
# validations square at two other sizes, so the token count differs in all three and a size baked in shows up
CASES = {"export": (2, 24, 16), "a": (1, 24, 24), "b": (2, 16, 16)}
# tokens of each text input per case (T5, Llama): the pipeline's 128 once, others elsewhere
TEXT_TOKENS = {"export": (16, 12), "a": (128, 128), "b": (9, 21)}


def patch_tokens(latents: np.ndarray, patch: int, max_seq: int):
    """The validation inputs' layout (the engine's is engine/families/hidream.py, tested against diffusers):
    ``HiDreamImageTransformer2DModel.patchify`` in numpy: (tokens (B, S, p*p*C), key mask (B, S), ids (S, 3))
    with S = h*w/p^2 for a square latent and ``max_seq`` (zero-padded) otherwise."""
    b, c, h, w = latents.shape
    ph, pw = h // patch, w // patch
    x = latents.reshape(b, c, ph, patch, pw, patch)
    n = ph * pw
    seq = n if h == w else max_seq
    # square: (b, ph, pw, p, p, c); non-square: diffusers permutes to (b, ph, pw, p, p) then channels last too
    tokens = np.zeros((b, seq, patch * patch * c), dtype=latents.dtype)
    tokens[:, :n] = x.transpose(0, 2, 4, 3, 5, 1).reshape(b, n, patch * patch * c)
    mask = np.zeros((b, seq), dtype=np.float32)
    mask[:, :n] = 1.0
    ids = np.zeros((seq, 3), dtype=np.float32)
    ids[:n, 1] = np.repeat(np.arange(ph), pw)
    ids[:n, 2] = np.tile(np.arange(pw), ph)
    return tokens, mask, ids


def _forward(model, hidden_states, hidden_states_masks, img_ids, timesteps, t5, llama3, pooled):
    """``HiDreamImageTransformer2DModel.forward`` from its patch tokens to the final layer's, dense MoE."""
    import torch

    with dense_moe():
        batch = hidden_states.shape[0]
        image_tokens = hidden_states.shape[1]
        hidden_states = model.x_embedder(hidden_states)
        dim = hidden_states.shape[-1]
        temb = model.t_embedder(timesteps, hidden_states.dtype) + model.p_embedder(pooled)

        states = [llama3[k] for k in model.config.llama_layers]
        states = [model.caption_projection[i](s).view(batch, -1, dim) for i, s in enumerate(states)]
        states.append(model.caption_projection[-1](t5).view(batch, -1, dim))

        ids = img_ids.unsqueeze(0).expand(batch, -1, -1)
        text_tokens = states[-1].shape[1] + states[-2].shape[1] + states[0].shape[1]
        txt_ids = torch.zeros(batch, text_tokens, 3, device=ids.device)  # the device: meta when streamed
        rotary = _rotary(model.pe_embedder, torch.cat((ids, txt_ids.to(ids.dtype)), dim=1))

        block_id = 0
        initial = torch.cat([states[-1], states[-2]], dim=1)
        initial_len = initial.shape[1]
        for block in model.double_stream_blocks:
            current = states[block_id]
            hidden_states, initial = block(
                hidden_states=hidden_states,
                hidden_states_masks=hidden_states_masks,
                encoder_hidden_states=torch.cat([initial, current], dim=1),
                temb=temb,
                image_rotary_emb=rotary,
            )
            initial = initial[:, :initial_len]
            block_id += 1

        hidden_states = torch.cat([hidden_states, initial], dim=1)
        joint_len = hidden_states.shape[1]
        llama_len = states[0].shape[1]
        text_mask = torch.ones(batch, initial_len + llama_len, device=hidden_states_masks.device)
        masks = torch.cat([hidden_states_masks, text_mask], dim=1)
        for block in model.single_stream_blocks:
            hidden_states = torch.cat([hidden_states, states[block_id]], dim=1)
            hidden_states = block(
                hidden_states=hidden_states,
                hidden_states_masks=masks,
                encoder_hidden_states=None,
                temb=temb,
                image_rotary_emb=rotary,
            )
            hidden_states = hidden_states[:, :joint_len]
            block_id += 1
        return (model.final_layer(hidden_states[:, :image_tokens], temb),)


def _rope(pos, dim: int, theta: int):
    """diffusers' ``rope`` with its outer product spelled as a float64 multiply: its einsum mixes the float32
    positions with float64 frequencies, which torch promotes and ONNX's Einsum refuses. The same numbers."""
    import torch

    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    batch, seq = pos.shape
    out = pos.to(torch.float64)[..., None] * omega
    cos, sin = torch.cos(out), torch.sin(out)
    return torch.stack([cos, -sin, sin, cos], dim=-1).view(batch, -1, dim // 2, 2, 2).float()


def _rotary(embedder, ids):
    """``HiDreamImageEmbedND.forward`` with ``_rope``."""
    import torch

    axes = [_rope(ids[..., i], embedder.axes_dim[i], embedder.theta) for i in range(ids.shape[-1])]
    return torch.cat(axes, dim=-3).unsqueeze(2)


def check_supported(module) -> None:
    cfg = module.config
    if not cfg.patch_size:
        raise TypeError("no ONNX export for a HiDreamImageTransformer2DModel without a patch_size")
    if sum(cfg.axes_dims_rope) != cfg.attention_head_dim:  # the other branch rotates half the head
        raise TypeError("no ONNX export for a HiDreamImageTransformer2DModel whose rotary axes are not its head")


def max_seq(cfg) -> int:
    return cfg.max_resolution[0] * cfg.max_resolution[1] // (cfg.patch_size * cfg.patch_size)


def transformer_component(module) -> Component:
    check_supported(module)
    cfg = module.config
    inputs = {
        "hidden_states": {0: "batch_size", 1: "image_tokens"},
        "hidden_states_masks": {0: "batch_size", 1: "image_tokens"},
        "img_ids": {0: "image_tokens"},
        "timestep": {0: "batch_size"},
        "encoder_hidden_states_t5": {0: "batch_size", 1: "t5_tokens"},
        "encoder_hidden_states_llama3": {1: "batch_size", 2: "llama_tokens"},
        "pooled_embeds": {0: "batch_size"},
    }
    llama_states = max(cfg.llama_layers) + 1
    t5_dim, llama_dim = cfg.caption_channels

    def make_inputs(case: str) -> dict[str, np.ndarray]:
        batch, h, w = CASES[case]
        rng = np.random.default_rng(_stable_seed("hidream", case))
        t5_tokens, llama_tokens = TEXT_TOKENS[case]
        tokens, mask, ids = patch_tokens(_randn(rng, batch, cfg.in_channels, h, w), cfg.patch_size, max_seq(cfg))
        return {
            "hidden_states": tokens,
            "hidden_states_masks": mask,
            "img_ids": ids,
            "timestep": rng.uniform(1, 999, size=(batch,)).astype(np.float32),  # raw timesteps, as the pipeline
            "encoder_hidden_states_t5": _randn(rng, batch, t5_tokens, t5_dim),
            "encoder_hidden_states_llama3": _randn(rng, llama_states, batch, llama_tokens, llama_dim),
            "pooled_embeds": _randn(rng, batch, cfg.text_emb_dim),
        }

    return Component(
        name="transformer",
        kind="hidream-transformer",
        module=module,
        inputs=inputs,
        outputs={"out_hidden_states": {0: "batch_size", 1: "image_tokens"}},
        make_inputs=make_inputs,
        wrapper=_wrapper(_forward)(module).eval(),
        rebuild=transformer_component,
    )


def tiny_transformer(seed: int, t5_dim: int, llama_dim: int, pooled_dim: int):
    """A tiny HiDream transformer, seeded: 1 double- and 1 single-stream block of 4 heads x 8, with the real
    model's 16 latent channels, patch 2, 4 routed experts of which 2 are active, and rotary axes that cover the
    head (as the real (64, 32, 32) of 128 do)."""
    import torch
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(seed)
    return HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_channels=[t5_dim, llama_dim],
        text_emb_dim=pooled_dim,
        num_routed_experts=4,
        num_activated_experts=2,
        axes_dims_rope=(4, 2, 2),
        max_resolution=(32, 32),
        llama_layers=(2, 1),  # into the tiny Llama's 3 layers: not in order, not from the first
    ).eval()
