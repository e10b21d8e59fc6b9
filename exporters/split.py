"""The denoiser as the graphs a step cache needs (``stepwise export --cache-graphs``), beside the whole graph.

First Block Cache (diffusers.hooks.first_block_cache) runs the transformer's first block every step, and
the remaining blocks only when the first block's residual changed enough; otherwise it adds the residual the
remaining blocks produced last time. So the transformer is written as three graphs, with the tensors that
flow between its parts passed from one to the next:

- ``transformer_first_block``: the prologue (patch, time/text and context embeddings, rotary embedding)
  and the first block → ``first_block_input`` and ``first_block_hidden_states`` (its input and output
  hidden states), ``first_block_encoder_hidden_states``, ``temb`` and ``rotary_cos``/``rotary_sin``;
- ``transformer_blocks``: every other block (the hook's "remaining" blocks and its tail block) → hidden
  states (the encoder states after the last block are not used by the output layers, so not returned);
- ``transformer_out``: ``norm_out`` + ``proj_out``.

Their composition is the whole transformer (checked at export: exporters/main.py). The split is FLUX's:
diffusers 0.39's hook does not run on SD3's transformer (registry/cache.py says why), so there is nothing to
reproduce there. Every part traces with the same streaming exporter as the whole (meta device, weights
written one tensor at a time), each graph holding only its part's weights.
"""

from __future__ import annotations

import numpy as np

from registry.cache import SPLIT_GRAPHS

from .components import LATENT_CASES, Component, _randn, _stable_seed, _wrapper, flux_transformer

GRAPHS = SPLIT_GRAPHS  # in the order they run
SPLIT_CLASSES = ("FluxTransformer2DModel",)


def _blocks(model) -> list:
    return [*model.transformer_blocks, *model.single_transformer_blocks]


def _run_blocks(blocks, hidden, encoder, temb, cos, sin):
    for block in blocks:
        encoder, hidden = block(
            hidden_states=hidden, encoder_hidden_states=encoder, temb=temb, image_rotary_emb=(cos, sin)
        )
    return hidden, encoder


def _first_block_forward(guidance: bool):
    def forward(model, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, *rest):
        import torch

        # FluxTransformer2DModel.forward up to its first block, line for line
        hidden = model.x_embedder(hidden_states)
        timestep = timestep.to(hidden.dtype) * 1000
        if guidance:
            temb = model.time_text_embed(timestep, rest[0].to(hidden.dtype) * 1000, pooled_projections)
        else:
            temb = model.time_text_embed(timestep, pooled_projections)
        encoder = model.context_embedder(encoder_hidden_states)
        cos, sin = model.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        out_hidden, out_encoder = _run_blocks(_blocks(model)[:1], hidden, encoder, temb, cos, sin)
        return hidden, out_hidden, out_encoder, temb, cos, sin

    return forward


def _blocks_forward(model, hidden_states, encoder_hidden_states, temb, rotary_cos, rotary_sin):
    hidden, _ = _run_blocks(_blocks(model)[1:], hidden_states, encoder_hidden_states, temb, rotary_cos, rotary_sin)
    return (hidden,)


def _out_forward(model, hidden_states, temb):
    return (model.proj_out(model.norm_out(hidden_states, temb)),)


def _dims(module) -> tuple[int, int]:
    cfg = module.config
    return cfg.num_attention_heads * cfg.attention_head_dim, cfg.attention_head_dim


def _inner_inputs(module, case: str, *, encoder: bool) -> dict[str, np.ndarray]:
    """Test inputs of the inner graphs: the first block's outputs at the plain graph's case shapes."""
    batch, h, w = LATENT_CASES[case]
    width, head = _dims(module)
    rng = np.random.default_rng(_stable_seed("flux-split", case))
    image, text = (h // 2) * (w // 2), 256 if case == "a" else 24
    feeds = {"hidden_states": _randn(rng, batch, image, width)}
    if encoder:
        feeds["encoder_hidden_states"] = _randn(rng, batch, text, width)
    feeds["temb"] = _randn(rng, batch, width)
    if encoder:
        angles = rng.uniform(-np.pi, np.pi, size=(text + image, head)).astype(np.float32)
        feeds["rotary_cos"], feeds["rotary_sin"] = np.cos(angles), np.sin(angles)
    return feeds


def graphs(module) -> list[Component]:
    """The three Components of a FLUX transformer's split, in the order they run."""
    if type(module).__name__ not in SPLIT_CLASSES:
        raise TypeError(f"no step-cache graphs for {type(module).__name__}")
    whole = flux_transformer(module)
    guidance = bool(module.config.guidance_embeds)
    blocks = _blocks(module)
    image = {0: "batch_size", 1: "packed_height_width"}
    text = {0: "batch_size", 1: "sequence_length"}
    rotary = {0: "rotary_length"}
    first = Component(
        name="transformer_first_block",
        kind="flux-transformer-first-block",
        module=module,
        inputs=whole.inputs,
        outputs={
            "first_block_input": image,
            "first_block_hidden_states": image,
            "first_block_encoder_hidden_states": text,
            "temb": {0: "batch_size"},
            "rotary_cos": rotary,
            "rotary_sin": rotary,
        },
        make_inputs=whole.make_inputs,
        wrapper=_wrapper(_first_block_forward(guidance))(module).eval(),
        parts=(module.x_embedder, module.time_text_embed, module.context_embedder, module.pos_embed, blocks[0]),
        rebuild=lambda other: graphs(other)[0],
    )
    rest = Component(
        name="transformer_blocks",
        kind="flux-transformer-blocks",
        module=module,
        inputs={
            "hidden_states": image,
            "encoder_hidden_states": text,
            "temb": {0: "batch_size"},
            "rotary_cos": rotary,
            "rotary_sin": rotary,
        },
        outputs={"out_hidden_states": image},
        make_inputs=lambda case: _inner_inputs(module, case, encoder=True),
        wrapper=_wrapper(_blocks_forward)(module).eval(),
        parts=tuple(blocks[1:]),
        rebuild=lambda other: graphs(other)[1],
    )
    out = Component(
        name="transformer_out",
        kind="flux-transformer-out",
        module=module,
        inputs={"hidden_states": image, "temb": {0: "batch_size"}},
        outputs={"out_hidden_states": image},
        make_inputs=lambda case: _inner_inputs(module, case, encoder=False),
        wrapper=_wrapper(_out_forward)(module).eval(),
        parts=(module.norm_out, module.proj_out),
        rebuild=lambda other: graphs(other)[2],
    )
    return [first, rest, out]


def blocks_feeds(first: dict, hidden: np.ndarray) -> dict[str, np.ndarray]:
    """The remaining blocks' inputs from the first graph's outputs."""
    return {
        "hidden_states": hidden,
        "encoder_hidden_states": first["first_block_encoder_hidden_states"],
        "temb": first["temb"],
        "rotary_cos": first["rotary_cos"],
        "rotary_sin": first["rotary_sin"],
    }


def compose(run, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The whole transformer's output from the three graphs (``run(name, feeds) → dict``), every block run:
    what the export checks against the whole graph."""
    first = run("transformer_first_block", feeds)
    hidden = run("transformer_blocks", blocks_feeds(first, first["first_block_hidden_states"]))["out_hidden_states"]
    return run("transformer_out", {"hidden_states": hidden, "temb": first["temb"]})["out_hidden_states"]
