"""The denoiser as the graphs a step cache needs (``stepwise export --cache-graphs``), beside the whole graph.

FLUX's and Qwen-Image's transformers (fbcache, magcache) and SD 3's (magcache) are split in three; a UNet
(deepcache) in two, below. Qwen-Image's split is written in exporters/qwen_image/transformer.py (its forward's
knowledge stays there), with the same graph and tensor names; its rotary tables are inputs of the whole graph,
which the first and the remaining blocks' graphs take under the same names. For TaylorSeer's default mode
FLUX's, SD 3's and Qwen-Image's transformers are also written whole twice, recording or given every block's
attention output (below; Qwen-Image's around its own whole forward, in its package); those two graphs read the
whole graph's weights (exporters/shared_weights.py).

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

Their composition is the whole transformer (checked at export: exporters/main.py). SD 3's transformer is
split the same way, with the same graph and tensor names, for MagCache (diffusers' hook puts its head on the
first of ``transformer_blocks`` and its tail on the last, as on FLUX): no rotary embedding; its output layers
also unpatchify, so ``transformer_out`` takes the whole graph's latent ``sample`` too, for its height and
width only. Every part traces with the same streaming exporter as the whole (meta device, weights written one
tensor at a time), each graph holding only its part's weights.
"""

from __future__ import annotations

import re

import numpy as np

from registry.cache import DEEPCACHE_GRAPHS, SPLIT_GRAPHS, TAYLOR_GRAPHS, blocks_feeds, out_feeds

from .components import (
    LATENT_CASES,
    TEXT_SEQ,
    Component,
    _randn,
    _stable_seed,
    _wrapper,
    flux_transformer,
    sd3_transformer,
    unet,
    unet_forward,
)

GRAPHS = (*SPLIT_GRAPHS, *TAYLOR_GRAPHS, *DEEPCACHE_GRAPHS)
# the denoiser class → (the whole graph's name, its output, the split graphs in the order they run)
SPLITS = {
    "FluxTransformer2DModel": ("transformer", "out_hidden_states", (*SPLIT_GRAPHS, *TAYLOR_GRAPHS)),
    "SD3Transformer2DModel": ("transformer", "out_hidden_states", (*SPLIT_GRAPHS, *TAYLOR_GRAPHS)),
    # qwen_image/transformer.py writes its split and its TaylorSeer graphs
    "QwenImageTransformer2DModel": ("transformer", "out_hidden_states", (*SPLIT_GRAPHS, *TAYLOR_GRAPHS)),
    "UNet2DConditionModel": ("unet", "out_sample", DEEPCACHE_GRAPHS),
}
SPLIT_CLASSES = tuple(SPLITS)


def _sd3(model) -> bool:
    return type(model).__name__ == "SD3Transformer2DModel"


def _blocks(model) -> list:
    return [*model.transformer_blocks, *getattr(model, "single_transformer_blocks", ())]


def _run_blocks(blocks, hidden, encoder, temb, cos=None, sin=None):
    # SD 3's JointTransformerBlock takes no rotary embedding; FLUX's blocks need it
    rotary = {} if cos is None else {"image_rotary_emb": (cos, sin)}
    for block in blocks:
        encoder, hidden = block(hidden_states=hidden, encoder_hidden_states=encoder, temb=temb, **rotary)
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


def _sd3_first_block_forward(model, hidden_states, encoder_hidden_states, pooled_projections, timestep):
    # SD3Transformer2DModel.forward up to its first block, line for line
    hidden = model.pos_embed(hidden_states)
    temb = model.time_text_embed(timestep, pooled_projections)
    encoder = model.context_embedder(encoder_hidden_states)
    out_hidden, out_encoder = _run_blocks(_blocks(model)[:1], hidden, encoder, temb)
    return hidden, out_hidden, out_encoder, temb


def _blocks_forward(model, hidden_states, encoder_hidden_states, temb, *rotary):
    hidden, _ = _run_blocks(_blocks(model)[1:], hidden_states, encoder_hidden_states, temb, *rotary)
    return (hidden,)


def _out_forward(model, hidden_states, temb):
    return (model.proj_out(model.norm_out(hidden_states, temb)),)


def _sd3_out_forward(model, hidden_states, temb, sample):
    # SD3Transformer2DModel.forward after its blocks, line for line: the output layers, then unpatchify to
    # the latent's size (``sample``: the whole graph's input, read for its height and width only)
    hidden = model.proj_out(model.norm_out(hidden_states, temb))
    patch, channels = model.config.patch_size, model.out_channels
    height, width = sample.shape[-2] // patch, sample.shape[-1] // patch
    hidden = hidden.reshape(hidden.shape[0], height, width, patch, patch, channels)
    hidden = hidden.permute(0, 5, 1, 3, 2, 4)  # einsum("nhwpqc->nchpwq")
    return (hidden.reshape(hidden.shape[0], channels, height * patch, width * patch),)


def _dims(module) -> tuple[int, int]:
    cfg = module.config
    return cfg.num_attention_heads * cfg.attention_head_dim, cfg.attention_head_dim


def _inner_inputs(module, case: str, *, encoder: bool) -> dict[str, np.ndarray]:
    """Test inputs of the inner graphs: the first block's outputs at the plain graph's case shapes."""
    batch, h, w = LATENT_CASES[case]
    width, head = _dims(module)
    sd3 = _sd3(module)
    rng = np.random.default_rng(_stable_seed("sd3-split" if sd3 else "flux-split", case))
    patch = module.config.patch_size if sd3 else 2  # FLUX's latents come packed 2x2
    image = (h // patch) * (w // patch)
    # the whole graph's text length: SD 3's CLIP + T5 tokens, FLUX's T5 tokens
    text = TEXT_SEQ[case] + (256 if case == "a" else 16) if sd3 else (256 if case == "a" else 24)
    feeds = {"hidden_states": _randn(rng, batch, image, width)}
    if encoder:
        feeds["encoder_hidden_states"] = _randn(rng, batch, text, width)
    feeds["temb"] = _randn(rng, batch, width)
    if encoder and not sd3:
        angles = rng.uniform(-np.pi, np.pi, size=(text + image, head)).astype(np.float32)
        feeds["rotary_cos"], feeds["rotary_sin"] = np.cos(angles), np.sin(angles)
    if not encoder and sd3:  # the output layers' latent, for its size
        feeds["sample"] = _randn(rng, batch, module.out_channels, h, w)
    return feeds


def graphs(module, **unet_options) -> list[Component]:
    """The Components of ``module``'s split, in the order they run (``unet_options``: components.unet's), then
    (transformers) TaylorSeer's record and predict graphs."""
    cls = type(module).__name__
    if cls == "UNet2DConditionModel":
        return unet_graphs(module, **unet_options)
    return [*_split_graphs(module), *(taylor_graphs(module) if cls in TAYLOR_CLASSES else ())]


def _split_graphs(module) -> list[Component]:
    cls = type(module).__name__
    if cls not in SPLIT_CLASSES:
        raise TypeError(f"no step-cache graphs for {cls}")
    if cls == "QwenImageTransformer2DModel":  # the family's knowledge stays in its package
        from .qwen_image.transformer import split_components

        return split_components(module)
    sd3 = _sd3(module)
    blocks = _blocks(module)
    if len(blocks) < 2:
        raise TypeError("the step-cache split needs a transformer of two blocks or more")
    kind = "sd3" if sd3 else "flux"
    image = {0: "batch_size", 1: "image_tokens" if sd3 else "packed_height_width"}
    text = {0: "batch_size", 1: "sequence_length"}
    rotary = {} if sd3 else {"rotary_cos": {0: "rotary_length"}, "rotary_sin": {0: "rotary_length"}}
    if sd3:
        whole = sd3_transformer(module)
        forward = _sd3_first_block_forward
        prologue = (module.pos_embed, module.time_text_embed, module.context_embedder)
        latent = {0: "batch_size", 2: "height", 3: "width"}
        out_inputs = {"hidden_states": image, "temb": {0: "batch_size"}, "sample": latent}
        out_outputs, out_forward = {"out_hidden_states": latent}, _sd3_out_forward
    else:
        whole = flux_transformer(module)
        forward = _first_block_forward(bool(module.config.guidance_embeds))
        prologue = (module.x_embedder, module.time_text_embed, module.context_embedder, module.pos_embed)
        out_inputs = {"hidden_states": image, "temb": {0: "batch_size"}}
        out_outputs, out_forward = {"out_hidden_states": image}, _out_forward
    first = Component(
        name="transformer_first_block",
        kind=f"{kind}-transformer-first-block",
        module=module,
        inputs=whole.inputs,
        outputs={
            "first_block_input": image,
            "first_block_hidden_states": image,
            "first_block_encoder_hidden_states": text,
            "temb": {0: "batch_size"},
            **rotary,
        },
        make_inputs=whole.make_inputs,
        wrapper=_wrapper(forward)(module).eval(),
        parts=(*prologue, blocks[0]),
        rebuild=lambda other: _split_graphs(other)[0],
    )
    rest = Component(
        name="transformer_blocks",
        kind=f"{kind}-transformer-blocks",
        module=module,
        inputs={"hidden_states": image, "encoder_hidden_states": text, "temb": {0: "batch_size"}, **rotary},
        outputs={"out_hidden_states": image},
        make_inputs=lambda case: _inner_inputs(module, case, encoder=True),
        wrapper=_wrapper(_blocks_forward)(module).eval(),
        parts=tuple(blocks[1:]),
        rebuild=lambda other: _split_graphs(other)[1],
    )
    out = Component(
        name="transformer_out",
        kind=f"{kind}-transformer-out",
        module=module,
        inputs=out_inputs,
        outputs=out_outputs,
        make_inputs=lambda case: _inner_inputs(module, case, encoder=False),
        wrapper=_wrapper(out_forward)(module).eval(),
        parts=(module.norm_out, module.proj_out),
        rebuild=lambda other: _split_graphs(other)[2],
    )
    return [first, rest, out]


def compose(cls: str, run, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The whole denoiser's output from its step-cache graphs (``run(name, feeds) → dict``), each way a cache
    composes them, every part run: what the export checks against the whole graph. The split's three parts in
    a row; TaylorSeer's record graph alone; its predict graph fed the attention outputs the record graph gave."""
    if cls == "UNet2DConditionModel":
        deep = run("unet_deep", feeds)["deep_features"]
        return {"split": run("unet_shallow", {**feeds, "deep_features": deep})["out_sample"]}
    first = run("transformer_first_block", feeds)
    hidden = run("transformer_blocks", blocks_feeds(first, first["first_block_hidden_states"], feeds))[
        "out_hidden_states"
    ]
    split = run("transformer_out", out_feeds(first, hidden, feeds))["out_hidden_states"]
    if cls not in TAYLOR_CLASSES:
        return {"split": split}
    recorded = run(RECORD, feeds)
    predicted = run(PREDICT, {**feeds, **recorded})["out_hidden_states"]
    return {"split": split, "taylorseer record": recorded["out_hidden_states"], "taylorseer predict": predicted}


# --- TaylorSeer (default mode): the transformer recording, or given, every hooked attention module's output ---
#
# diffusers' TaylorSeer hooks every block's attention module (names fullmatching its identifiers): a computed
# call runs them and updates each one's Taylor factors from its outputs; a predicted call has each return its
# Taylor prediction instead, and the rest of the transformer (norms, modulation, feed-forwards, residuals,
# output layers) runs on them as usual. So the transformer is written twice, from the diffusers model itself
# with only its attention modules' forward replaced:
#
# - ``transformer_taylor_record``: the whole transformer → ``out_hidden_states`` and every hooked module's
#   outputs (named ``<module>.output_<i>``: FLUX's joint blocks, SD 3's and Qwen-Image's return the image's
#   and the text's, FLUX's single blocks one over both);
# - ``transformer_taylor_predict``: the whole transformer's inputs and those outputs as inputs →
#   ``out_hidden_states``, no attention computed (their weights are not in it).

RECORD, PREDICT = TAYLOR_GRAPHS
# the transformers they are written for (Qwen-Image's in exporters/qwen_image/transformer.py, with this code)
TAYLOR_CLASSES = ("FluxTransformer2DModel", "SD3Transformer2DModel", "QwenImageTransformer2DModel")
# graph → the whole graph whose data file holds all its weights (exporters/shared_weights.py links them)
WEIGHTS_OF = {RECORD: "transformer", PREDICT: "transformer"}
# diffusers.hooks.taylorseer_cache._TRANSFORMER_BLOCK_IDENTIFIERS (0.39): what its default mode hooks
ATTENTION_PATTERNS = (
    "^blocks.*attn",
    "^transformer_blocks.*attn",
    "^single_transformer_blocks.*attn",
    "^temporal_transformer_blocks.*attn",
)


def attention_modules(model) -> list[tuple[str, object]]:
    """The modules TaylorSeer's default mode hooks, by name, in the order the transformer calls them."""
    return [
        (name, sub)
        for name, sub in model.named_modules()
        if any(re.fullmatch(pattern, name) for pattern in ATTENTION_PATTERNS)
    ]


def _output_count(attn) -> int:
    # a joint attention (context projections: FLUX's double blocks, SD 3's) returns the image's and the text's
    return 2 if getattr(attn, "add_q_proj", None) is not None else 1


def attention_outputs(model, image: dict | None = None, text: dict | None = None) -> dict[str, dict[int, str]]:
    """Graph name → dynamic axes of every hooked module's outputs, in the order they are recorded (``image``,
    ``text``: a joint attention's two outputs' axes, FLUX's and SD 3's unless given)."""
    sd3 = _sd3(model)
    image = image or {0: "batch_size", 1: "image_tokens" if sd3 else "packed_height_width"}
    text, joint = text or {0: "batch_size", 1: "sequence_length"}, {0: "batch_size", 1: "rotary_length"}
    out = {}
    for name, attn in attention_modules(model):
        count = _output_count(attn)
        for index, axes in enumerate((image, text) if count == 2 else (joint,)):
            out[f"{name}.output_{index}"] = axes
    return out


def _patched(model, replace):
    """Each hooked module's forward replaced by ``replace(name, original_forward)`` for one call: a context."""
    import contextlib

    @contextlib.contextmanager
    def patched():
        modules = attention_modules(model)
        for name, attn in modules:
            attn.forward = replace(name, attn.forward)
        try:
            yield
        finally:
            for _, attn in modules:
                del attn.forward

    return patched()


def _whole_forward(names: list[str]):
    # the whole graph's forward (components.flux_transformer / sd3_transformer): its inputs are the model's
    # keyword arguments of the same names
    def forward(model, *args):
        return (model(**dict(zip(names, args, strict=True)), return_dict=False)[0],)

    return forward


def _recorded(attention: dict) -> list[tuple[str, int]]:
    """(module, output index) of each graph name ``<module>.output_<i>``, in order."""
    return [(name, int(index)) for name, index in (key.rsplit(".output_", 1) for key in attention)]


def _record_forward(whole, attention: dict):
    def forward(model, *args):
        recorded: dict[str, tuple] = {}

        def record(name, original):
            def run(*a, **k):
                out = original(*a, **k)
                recorded[name] = (out,) if not isinstance(out, tuple) else out
                return out

            return run

        with _patched(model, record):
            (out,) = whole(model, *args)
        # the values the blocks go on with, as graph outputs too (the attention fusion keeps a rewritten
        # node's output name, graph outputs included: exporters/weights.replace_node)
        return (out, *(recorded[name][index] for name, index in _recorded(attention)))

    return forward


def _predict_forward(whole, attention: dict):
    count = len(attention)

    def forward(model, *args):
        import torch

        given = dict(zip(_recorded(attention), args[len(args) - count :], strict=True))
        counts = {name: _output_count(attn) for name, attn in attention_modules(model)}

        def predict(name, _original):
            def run(*_a, **k):
                # an output the graph is not given feeds nothing the transformer returns (Qwen-Image's last
                # joint attention's text output): zeros of its shape, the encoder states the module was called on
                outputs = tuple(
                    given[(name, i)] if (name, i) in given else torch.zeros_like(k["encoder_hidden_states"])
                    for i in range(counts[name])
                )
                return outputs if len(outputs) == 2 else outputs[0]

            return run

        with _patched(model, predict):
            return whole(model, *args[: len(args) - count])

    return forward


class _OwnParameters:
    """A module's own parameters (not its children's), for a Component's parameter count."""

    def __init__(self, module):
        self.module = module

    def parameters(self):
        return self.module.parameters(recurse=False)


def _attention_inputs(module, whole, attention: dict, case: str) -> dict[str, np.ndarray]:
    """The predict graph's test inputs: the whole graph's, and attention outputs of their shapes (random: the
    graph is compared with PyTorch on them; the export composes it with the record graph's real ones)."""
    feeds = whole.make_inputs(case)
    batch = feeds["hidden_states"].shape[0]
    if _sd3(module):
        patch = module.config.patch_size
        image = (feeds["hidden_states"].shape[2] // patch) * (feeds["hidden_states"].shape[3] // patch)
    else:
        image = feeds["hidden_states"].shape[1]
    text = feeds["encoder_hidden_states"].shape[1]
    width = _dims(module)[0]
    tokens = {
        "image_tokens": image,
        "packed_height_width": image,
        "sequence_length": text,
        "text_tokens": text,  # Qwen-Image's
        "rotary_length": text + image,
    }
    rng = np.random.default_rng(_stable_seed("taylor-predict", case))
    for name, axes in attention.items():
        feeds[name] = _randn(rng, batch, tokens[axes[1]], width)
    return feeds


def taylor_components(module, whole: Component, forward, kind: str, attention: dict, rebuild) -> list[Component]:
    """TaylorSeer's record and predict graphs around ``whole`` (the whole transformer's Component; ``forward``:
    its forward, ``forward(model, *inputs) → (output,)``); ``attention``: attention_outputs' axes;
    ``rebuild(other)``: the two around another module (the reduced-depth build)."""
    names = {name for name, _ in attention_modules(module)}
    rest = [
        _OwnParameters(sub)
        for name, sub in module.named_modules()
        if not any(name == hooked or name.startswith(hooked + ".") for hooked in names)
    ]
    record = Component(
        name=RECORD,
        kind=f"{kind}-transformer-taylor-record",
        module=module,
        inputs=whole.inputs,
        outputs={**whole.outputs, **attention},
        make_inputs=whole.make_inputs,
        wrapper=_wrapper(_record_forward(forward, attention))(module).eval(),
        rebuild=lambda other: rebuild(other)[0],
    )
    predict = Component(
        name=PREDICT,
        kind=f"{kind}-transformer-taylor-predict",
        module=module,
        inputs={**whole.inputs, **attention},
        outputs=whole.outputs,
        make_inputs=lambda case: _attention_inputs(module, whole, attention, case),
        wrapper=_wrapper(_predict_forward(forward, attention))(module).eval(),
        parts=tuple(rest),
        rebuild=lambda other: rebuild(other)[1],
    )
    return [record, predict]


def taylor_graphs(module) -> list[Component]:
    """TaylorSeer's record and predict graphs of a FLUX or SD 3 transformer (Qwen-Image's: its package's)."""
    if type(module).__name__ == "QwenImageTransformer2DModel":
        from .qwen_image.transformer import taylor_components as qwen_taylor

        return qwen_taylor(module)
    sd3 = _sd3(module)
    whole = sd3_transformer(module) if sd3 else flux_transformer(module)
    kind = "sd3" if sd3 else "flux"
    forward = _whole_forward(list(whole.inputs))
    return taylor_components(module, whole, forward, kind, attention_outputs(module), taylor_graphs)


# --- DeepCache: the UNet as its deep part and its shallow branch ---------------------------------------------
#
# DeepCacheSDHelper (the deepcache package) with cache_branch_id 0 recomputes, on a cached step, only the
# shallow branch: the time embedding, conv_in, the last layer of the last up block (its resnet and
# attention, fed the concatenation of the feature cached at the last full step and conv_in's fresh output as
# the skip connection) and the output layers. Every other module returns what it returned at the last full
# step. So the UNet is written as:
#
# - ``unet_deep``: the UNet up to the last up block's last layer → ``deep_features``, the hidden states that
#   layer concatenates with its skip connection (the output of the layer before it);
# - ``unet_shallow``: the UNet's inputs and ``deep_features`` → ``out_sample``: the shallow branch.
#
# A full step runs both (together they are the whole UNet, checked at export); a cached step runs the
# shallow one with the stored ``deep_features``. Other branch ids split the UNet elsewhere: not written.


def _up_layers(block) -> list[tuple]:
    attentions = list(getattr(block, "attentions", None) or [None] * len(block.resnets))
    return list(zip(block.resnets, attentions, strict=True))


def _run_up_layers(layers, hidden, res_tuple, temb, encoder_hidden_states):
    """CrossAttnUpBlock2D / UpBlock2D.forward's loop over ``layers`` (no FreeU, no upsampler)."""
    import torch

    for resnet, attention in layers:
        res, res_tuple = res_tuple[-1], res_tuple[:-1]
        hidden = resnet(torch.cat([hidden, res], dim=1), temb)
        if attention is not None:
            hidden = attention(
                hidden,
                encoder_hidden_states=encoder_hidden_states,
                cross_attention_kwargs=None,
                attention_mask=None,
                encoder_attention_mask=None,
                return_dict=False,
            )[0]
    return hidden


def _deep_forward(names: list[str], sdxl: bool, lcm: bool):
    whole = unet_forward(names, sdxl, lcm)

    def forward(model, *args):
        # the UNet's own forward, its last up block stopped before its last layer: what enters that layer is
        # the output; what the forward computes after it is unused and dropped from the graph
        block = model.up_blocks[-1]
        captured = []

        def stop(hidden_states, res_hidden_states_tuple, temb=None, encoder_hidden_states=None, **_):
            layers = _up_layers(block)[:-1]
            captured.append(_run_up_layers(layers, hidden_states, res_hidden_states_tuple, temb, encoder_hidden_states))
            return captured[-1]

        block.forward = stop
        try:
            whole(model, *args)
        finally:
            del block.forward
        # "+ 0": the graph output gets a node of its own, which the CPU attention fusion (exporters/optimize.py)
        # cannot fold into the block it rewrites and rename away; ONNX Runtime drops it when it loads the graph
        return (captured[0] + 0.0,)

    return forward


def _shallow_forward(names: list[str], sdxl: bool, lcm: bool):
    def forward(model, *args):
        feeds = dict(zip(names, args, strict=True))
        sample, timestep = feeds["sample"], feeds["timestep"]
        added = {"text_embeds": feeds["text_embeds"], "time_ids": feeds["time_ids"]} if sdxl else None
        # UNet2DConditionModel.forward's embeddings, line for line (no class labels, no image hints)
        emb = model.time_embedding(model.get_time_embed(sample=sample, timestep=timestep), feeds.get("timestep_cond"))
        context = feeds.get("encoder_hidden_states")  # not an input when the last layer has no attention
        aug = model.get_aug_embed(emb=emb, encoder_hidden_states=context, added_cond_kwargs=added)
        emb = emb + aug if aug is not None else emb
        if model.time_embed_act is not None:
            emb = model.time_embed_act(emb)
        context = model.process_encoder_hidden_states(encoder_hidden_states=context, added_cond_kwargs=added)
        skip = model.conv_in(sample)
        layer = _up_layers(model.up_blocks[-1])[-1:]
        hidden = _run_up_layers(layer, feeds["deep_features"], (skip,), emb, context)
        if model.conv_norm_out:
            hidden = model.conv_act(model.conv_norm_out(hidden))
        return (model.conv_out(hidden),)

    return forward


def unet_graphs(module, *, time_ids_dim: int = 6, text_embeds_dim: int | None = None) -> list[Component]:
    whole = unet(module, time_ids_dim=time_ids_dim, text_embeds_dim=text_embeds_dim)
    cfg = module.config
    sdxl, lcm = cfg.addition_embed_type == "text_time", cfg.time_cond_proj_dim is not None
    names = list(whole.inputs)
    block = module.up_blocks[-1]
    if len(block.resnets) < 2:
        raise TypeError("DeepCache needs the last up block to have two layers or more")
    channels = block.resnets[-2].out_channels
    latent = {0: "batch_size", 2: "height", 3: "width"}

    last = _up_layers(block)[-1]
    # the shallow branch reads the prompt only in the last layer's cross-attention (SDXL's last up block has none)
    shallow_names = [n for n in names if n != "encoder_hidden_states" or last[1] is not None] + ["deep_features"]

    def shallow_inputs(case: str) -> dict[str, np.ndarray]:
        feeds = whole.make_inputs(case)
        batch, _, h, w = feeds["sample"].shape
        rng = np.random.default_rng(_stable_seed("unet-shallow", case))
        feeds["deep_features"] = _randn(rng, batch, channels, h, w)
        return {name: feeds[name] for name in shallow_names}

    def rebuild(index):
        return lambda other: unet_graphs(other, time_ids_dim=time_ids_dim, text_embeds_dim=text_embeds_dim)[index]

    deep = Component(
        name="unet_deep",
        kind="unet-deep",
        module=module,
        inputs=whole.inputs,
        outputs={"deep_features": latent},
        make_inputs=whole.make_inputs,
        wrapper=_wrapper(_deep_forward(names, sdxl, lcm))(module).eval(),
        rebuild=rebuild(0),
    )
    shallow = Component(
        name="unet_shallow",
        kind="unet-shallow",
        module=module,
        inputs={name: {**whole.inputs, "deep_features": latent}[name] for name in shallow_names},
        outputs={"out_sample": latent},
        make_inputs=shallow_inputs,
        wrapper=_wrapper(_shallow_forward(shallow_names, sdxl, lcm))(module).eval(),
        parts=(
            module.time_embedding,
            getattr(module, "add_embedding", None),  # SDXL
            module.conv_in,
            *last,
            module.conv_norm_out,
            module.conv_out,
        ),
        rebuild=rebuild(1),
    )
    return [deep, shallow]
