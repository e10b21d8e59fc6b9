"""Qwen-Image's MMDiT (``QwenImageTransformer2DModel``) as one ONNX graph with its rotary tables as inputs.

diffusers builds the rotary tables as complex numbers (``torch.polar``) inside the model from the image's
grid and the prompt's length, which neither exports (ONNX has no complex type) nor stays dynamic (the text
length becomes a constant of the trace). The graph takes the tables' real and imaginary parts instead —
``img_freqs_cos/sin`` and ``txt_freqs_cos/sin`` — which the engine computes in numpy from the manifest's
axes (engine/families/qwen_image.py), and rotates in real arithmetic: the same products, as the complex
multiply ``(a + ib)(cos + i sin)`` spells them out.
"""

from __future__ import annotations

import contextlib

import numpy as np

from ..components import LATENT_CASES, Component, _randn, _stable_seed, _wrapper

# text tokens per validation case: another length for each, so a length baked into the graph shows up
TEXT_TOKENS = {"export": 20, "a": 24, "b": 9}


def rotary_tables(rope, height: int, width: int, text_tokens: int) -> dict[str, np.ndarray]:
    """diffusers' own complex tables (``rope``: a QwenEmbedRope) for a packed (height, width) grid, as the
    graph's four inputs."""
    import torch

    with torch.no_grad():
        img, txt = rope([(1, height, width)], max_txt_seq_len=text_tokens, device=torch.device("cpu"))
    return {
        "img_freqs_cos": img.real.float().numpy(),
        "img_freqs_sin": img.imag.float().numpy(),
        "txt_freqs_cos": txt.real.float().numpy(),
        "txt_freqs_sin": txt.imag.float().numpy(),
    }


def _rotate(x, freqs, use_real: bool = True, use_real_unbind_dim: int = -1):
    """``apply_rotary_emb_qwen(x, freqs, use_real=False)`` with ``freqs`` given as (cos, sin) tables."""
    import torch

    cos, sin = freqs
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # (S, D/2) over [B, S, H, D/2]
    real, imag = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    out = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return out.flatten(3).type_as(x)


@contextlib.contextmanager
def real_rotary():
    """The attention processor rotates with (cos, sin) tables while this is active."""
    from diffusers.models.transformers import transformer_qwenimage as module

    original = module.apply_rotary_emb_qwen
    module.apply_rotary_emb_qwen = _rotate
    try:
        yield
    finally:
        module.apply_rotary_emb_qwen = original


def _prologue(model, hidden_states, encoder_hidden_states, timestep):
    """QwenImageTransformer2DModel.forward up to its blocks: the image and text projections and temb."""
    hidden_states = model.img_in(hidden_states)
    timestep = timestep.to(hidden_states.dtype)
    encoder_hidden_states = model.txt_in(model.txt_norm(encoder_hidden_states))
    temb = model.time_text_embed(timestep, hidden_states)
    return hidden_states, encoder_hidden_states, temb


def _run_blocks(blocks, hidden_states, encoder_hidden_states, temb, img_cos, img_sin, txt_cos, txt_sin):
    """The forward's loop over ``blocks`` → (hidden states, encoder hidden states)."""
    rotary = ((img_cos, img_sin), (txt_cos, txt_sin))
    with real_rotary():
        for block in blocks:
            encoder_hidden_states, hidden_states = block(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                encoder_hidden_states_mask=None,
                temb=temb,
                image_rotary_emb=rotary,
            )
    return hidden_states, encoder_hidden_states


def _output_layers(model, hidden_states, temb):
    return model.proj_out(model.norm_out(hidden_states, temb))


def _forward(model, hidden_states, encoder_hidden_states, timestep, *tables):
    """QwenImageTransformer2DModel.forward as QwenImagePipeline calls it (no mask: each prompt runs alone,
    unpadded; no guidance embedding; no zero_cond_t), with the rotary tables given."""
    hidden_states, encoder_hidden_states, temb = _prologue(model, hidden_states, encoder_hidden_states, timestep)
    hidden_states, _ = _run_blocks(model.transformer_blocks, hidden_states, encoder_hidden_states, temb, *tables)
    return (_output_layers(model, hidden_states, temb),)


def check_supported(module) -> None:
    cfg = module.config
    variants = ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")
    unsupported = [k for k in variants if cfg.get(k)]
    if unsupported:  # the edit / layered pipelines' transformers
        raise TypeError(f"no ONNX export for a QwenImageTransformer2DModel with {', '.join(unsupported)}")


def transformer_component(module) -> Component:
    check_supported(module)
    cfg = module.config
    inputs = {
        "hidden_states": {0: "batch_size", 1: "image_tokens"},
        "encoder_hidden_states": {0: "batch_size", 1: "text_tokens"},
        "timestep": {0: "batch_size"},
        "img_freqs_cos": {0: "image_tokens"},
        "img_freqs_sin": {0: "image_tokens"},
        "txt_freqs_cos": {0: "text_tokens"},
        "txt_freqs_sin": {0: "text_tokens"},
    }

    def make_inputs(case: str) -> dict[str, np.ndarray]:
        batch, h, w = LATENT_CASES[case]  # latent size; the packed grid is half of it
        rng = np.random.default_rng(_stable_seed("qwen-image", case))
        text = TEXT_TOKENS[case]
        return {
            "hidden_states": _randn(rng, batch, (h // 2) * (w // 2), cfg.in_channels),
            "encoder_hidden_states": _randn(rng, batch, text, cfg.joint_attention_dim),
            "timestep": rng.uniform(0.01, 1.0, size=(batch,)).astype(np.float32),  # the pipeline passes t/1000
            **_tables(cfg, h // 2, w // 2, text),
        }

    return Component(
        name="transformer",
        kind="qwen-image-transformer",
        module=module,
        inputs=inputs,
        outputs={"out_hidden_states": {0: "batch_size", 1: "image_tokens"}},
        make_inputs=make_inputs,
        wrapper=_wrapper(_forward)(module).eval(),
        rebuild=transformer_component,
    )


def _tables(cfg, height: int, width: int, text_tokens: int) -> dict[str, np.ndarray]:
    """The tables from diffusers' own QwenEmbedRope (built alone: the component's module may be on meta)."""
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    rope = QwenEmbedRope(theta=10000, axes_dim=list(cfg.axes_dims_rope), scale_rope=True)
    return rotary_tables(rope, height, width, text_tokens)


def tiny_transformer(seed: int, joint_attention_dim: int):
    """diffusers' own test fixture (tests/pipelines/qwenimage), seeded; ``joint_attention_dim`` is the tiny text
    encoder's hidden size."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,  # 16 latent channels packed 2x2
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=joint_attention_dim,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),  # sums to attention_head_dim
    ).eval()


# --- the step-cache split (``stepwise export --cache-graphs``; exporters/split.py names the graphs) -----------
#
# diffusers' First Block Cache and MagCache hooks run on QwenImageTransformerBlock (hooks/_helpers.py registers
# it: hidden states returned second, encoder states first), the head hook on transformer_blocks[0], the tail on
# the last: the forward above in three graphs. The rotary tables are inputs of the whole graph: the first and
# the remaining blocks' graphs take them under the same names.


def _first_block_forward(model, hidden_states, encoder_hidden_states, timestep, *tables):
    hidden, encoder, temb = _prologue(model, hidden_states, encoder_hidden_states, timestep)
    out_hidden, out_encoder = _run_blocks(model.transformer_blocks[:1], hidden, encoder, temb, *tables)
    return hidden, out_hidden, out_encoder, temb


def _blocks_forward(model, hidden_states, encoder_hidden_states, temb, *tables):
    hidden, _ = _run_blocks(model.transformer_blocks[1:], hidden_states, encoder_hidden_states, temb, *tables)
    return (hidden,)


def _out_forward(model, hidden_states, temb):
    return (_output_layers(model, hidden_states, temb),)


def split_components(module) -> list[Component]:
    """The transformer as transformer_first_block, transformer_blocks and transformer_out, in the order they run."""
    whole = transformer_component(module)
    cfg = module.config
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    image, text = whole.inputs["hidden_states"], whole.inputs["encoder_hidden_states"]
    tables = {k: v for k, v in whole.inputs.items() if "_freqs_" in k}
    batch = {0: "batch_size"}

    def inner_inputs(case: str, *, blocks: bool) -> dict[str, np.ndarray]:
        """The inner graphs' test inputs at the whole graph's case shapes: random states, diffusers' tables."""
        count, h, w = LATENT_CASES[case]
        rng = np.random.default_rng(_stable_seed("qwen-image-split", case))
        feeds = {"hidden_states": _randn(rng, count, (h // 2) * (w // 2), inner)}
        if blocks:
            feeds["encoder_hidden_states"] = _randn(rng, count, TEXT_TOKENS[case], inner)
        feeds["temb"] = _randn(rng, count, inner)
        return {**feeds, **(_tables(cfg, h // 2, w // 2, TEXT_TOKENS[case]) if blocks else {})}

    blocks = list(module.transformer_blocks)
    prologue = (module.img_in, module.txt_norm, module.txt_in, module.time_text_embed)
    first = Component(
        name="transformer_first_block",
        kind="qwen-image-transformer-first-block",
        module=module,
        inputs=whole.inputs,
        outputs={
            "first_block_input": image,
            "first_block_hidden_states": image,
            "first_block_encoder_hidden_states": text,
            "temb": batch,
        },
        make_inputs=whole.make_inputs,
        wrapper=_wrapper(_first_block_forward)(module).eval(),
        parts=(*prologue, blocks[0]),
        rebuild=lambda other: split_components(other)[0],
    )
    rest = Component(
        name="transformer_blocks",
        kind="qwen-image-transformer-blocks",
        module=module,
        inputs={"hidden_states": image, "encoder_hidden_states": text, "temb": batch, **tables},
        outputs={"out_hidden_states": image},
        make_inputs=lambda case: inner_inputs(case, blocks=True),
        wrapper=_wrapper(_blocks_forward)(module).eval(),
        parts=tuple(blocks[1:]),
        rebuild=lambda other: split_components(other)[1],
    )
    out = Component(
        name="transformer_out",
        kind="qwen-image-transformer-out",
        module=module,
        inputs={"hidden_states": image, "temb": batch},
        outputs={"out_hidden_states": image},
        make_inputs=lambda case: inner_inputs(case, blocks=False),
        wrapper=_wrapper(_out_forward)(module).eval(),
        parts=(module.norm_out, module.proj_out),
        rebuild=lambda other: split_components(other)[2],
    )
    return [first, rest, out]


# --- TaylorSeer's default mode (``--cache-graphs``; exporters/split.py writes the two graphs) -------------------
#
# diffusers' TaylorSeer hooks ``^transformer_blocks.*attn``: each block's joint attention, which returns the
# image's and the text's outputs. The record and predict graphs are the forward above with those modules'
# forward replaced (split.taylor_components). The last block's text output feeds nothing the transformer
# returns (its output layers read the image's states only), so it is not recorded: the whole graph holds no
# weight for it (to_add_out), and the record graph would then need weights of its own instead of the whole
# graph's; the hook's prediction of it changes no number either. The predict graph computes no attention, so
# it reads no rotary table; it takes the whole graph's inputs all the same.


def taylor_components(module) -> list[Component]:
    """transformer_taylor_record and transformer_taylor_predict."""
    from .. import split

    whole = transformer_component(module)
    image, text = whole.inputs["hidden_states"], whole.inputs["encoder_hidden_states"]
    attention = split.attention_outputs(module, image, text)
    del attention[f"transformer_blocks.{len(module.transformer_blocks) - 1}.attn.output_1"]
    return split.taylor_components(module, whole, _forward, "qwen-image", attention, taylor_components)
