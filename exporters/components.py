"""What each ONNX graph is: its PyTorch module, graph input/output names, dynamic axes and test inputs.

One ``Component`` per graph, the same for both exporters (optimum's and plain ``torch.onnx``): the names
are optimum's (docs/design.md), and ``Component.reference`` is the PyTorch module called the way the
diffusers pipeline calls it, which is what validation compares each graph against.

Validation runs every graph at two input shapes that differ from each other and from the shapes the
graph was traced with: another batch size, another sequence length, and a non-square latent/image, so
a size baked into the graph shows up as an error or a mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from registry.pipelines import MASKED_TEXT_PIPELINES

# latent (height, width) per case: "export" is what the torch.onnx path traces with (batch 2,
# height != width); validation runs "a" and "b". All multiples of 8, so they fit any VAE and any UNet of up to
# 4 levels; a deeper UNet's cases are scaled up to its own multiple (``_unet_case``: IF-II-L's 5 levels, 16).
LATENT_CASES = {"export": (2, 24, 16), "a": (1, 32, 24), "b": (2, 16, 40)}
# (batch, sequence length) per case for text encoders; None = the tokenizer's max length.
TEXT_CASES = {"export": (2, None), "a": (1, None), "b": (2, 13)}
# Only the engine's real prompt length is validated for the denoisers' text inputs.
TEXT_SEQ = {"export": 77, "a": 77, "b": 19}

ATOL = 1e-4
# of the largest |reference| value: headroom for fp32 reordering in big graphs (the tiny models and a
# full-size random-weight SD 1.5 differ by ~1e-6 to 4e-5)
RTOL = 1e-3


@dataclass
class Component:
    name: str  # folder in the export: text_encoder, unet, vae_decoder, ...
    kind: str  # clip-text, clip-text-with-projection, t5-encoder, unet, sd3-transformer, flux-transformer, vae-*
    module: Any  # the torch.nn.Module whose weights this graph holds
    inputs: dict[str, dict[int, str]]  # graph input name -> dynamic axes, in call order
    outputs: dict[str, dict[int, str]]  # graph output name -> dynamic axes, in return order
    make_inputs: Any = field(repr=False, default=None)  # case -> {name: np.ndarray}
    wrapper: Any = field(repr=False, default=None)  # torch.nn.Module: forward(*inputs) -> tuple(outputs)
    parts: tuple = ()  # the submodules whose weights the graph holds, when not all of `module`
    rebuild: Any = field(repr=False, default=None)  # module -> the same Component around another module

    @property
    def params(self) -> int:
        modules = [m for m in self.parts if m is not None] or [self.module]
        return int(sum(p.numel() for m in modules for p in m.parameters()))

    def example(self, case: str) -> dict[str, np.ndarray]:
        return self.make_inputs(case)

    def reference(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        args = [torch.from_numpy(np.asarray(feeds[name])) for name in self.inputs]
        with torch.no_grad():
            outs = self.wrapper(*args)
        return {name: out.detach().cpu().numpy() for name, out in zip(self.outputs, outs, strict=True)}


def _stable_seed(*parts: str) -> int:
    import zlib

    return zlib.crc32("/".join(parts).encode())


def _randn(rng, *shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _wrapper(fn):
    import torch

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args):
            return fn(self.module, *args)

    return Wrapper


# --- text encoders ---------------------------------------------------------------------------------


def _clip_forward(with_projection: bool):
    def forward(model, input_ids):
        out = model(input_ids=input_ids, output_hidden_states=True, return_dict=True)
        first = (
            (out.text_embeds, out.last_hidden_state)
            if with_projection
            else (
                out.last_hidden_state,
                out.pooler_output,
            )
        )
        return (*first, *out.hidden_states)

    return forward


def _t5_forward(model, input_ids):
    return (model(input_ids=input_ids, return_dict=True).last_hidden_state,)


def _t5_masked_forward(model, input_ids, attention_mask):
    return (model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state,)


def text_encoder(name: str, module, max_length: int, *, attention_mask: bool = False) -> Component:
    """``attention_mask``: the graph takes the tokenizer's mask too, as DeepFloyd IF's pipelines pass it to T5
    (the padding is masked out of attention; SD 3 and FLUX run T5 on the padded ids alone)."""
    cls = type(module).__name__
    if cls in ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLTextModel"):  # Qwen-Image: the language model
        from .qwen_image.text import text_encoder_component

        return text_encoder_component(name, module, max_length)
    batch_seq = {0: "batch_size", 1: "sequence_length"}
    if cls.startswith("CLIPTextModel"):
        with_projection = cls == "CLIPTextModelWithProjection"
        layers = module.config.num_hidden_layers
        if with_projection:
            kind = "clip-text-with-projection"
            outputs = {"text_embeds": {0: "batch_size"}, "last_hidden_state": dict(batch_seq)}
        else:
            kind = "clip-text"
            outputs = {"last_hidden_state": dict(batch_seq), "pooler_output": {0: "batch_size"}}
        outputs.update({f"hidden_states.{i}": dict(batch_seq) for i in range(layers + 1)})
        forward = _clip_forward(with_projection)
        vocab = module.config.vocab_size
        eos = vocab - 1  # CLIP's <|endoftext|>, the largest id: what the pooling looks for
    elif cls == "T5EncoderModel":
        kind, outputs = "t5-encoder", {"last_hidden_state": dict(batch_seq)}
        forward = _t5_masked_forward if attention_mask else _t5_forward
        vocab, eos = module.config.vocab_size, module.config.eos_token_id
    else:
        raise TypeError(f"no ONNX export for text encoder class {cls}")

    def make_inputs(case: str) -> dict[str, np.ndarray]:
        batch, seq = TEXT_CASES[case]
        seq = seq or max_length
        rng = np.random.default_rng(_stable_seed(name, case))
        ids = rng.integers(3, max(vocab - 1, 4), size=(batch, seq), dtype=np.int64)
        mask = np.ones((batch, seq), dtype=np.int64)
        for row in range(batch):  # a prompt: tokens, one end-of-text, then padding
            end = int(rng.integers(1, seq))
            ids[row, end] = eos
            ids[row, end + 1 :] = eos if kind != "t5-encoder" else 0
            if attention_mask:
                mask[row, end + 1 :] = 0
        return {"input_ids": ids, "attention_mask": mask} if attention_mask else {"input_ids": ids}

    inputs = {"input_ids": dict(batch_seq)}
    if attention_mask:
        inputs["attention_mask"] = dict(batch_seq)
    return Component(
        name=name,
        kind=kind,
        module=module,
        inputs=inputs,
        outputs=outputs,
        make_inputs=make_inputs,
        wrapper=_wrapper(forward)(module).eval(),
        rebuild=lambda other: text_encoder(name, other, max_length, attention_mask=attention_mask),
    )


# --- denoisers -------------------------------------------------------------------------------------


def _unet_case(cfg, case: str) -> tuple[int, int, int]:
    """``LATENT_CASES[case]`` scaled to a multiple of the UNet's downsampling (2 ** (levels - 1)): the skip
    connections are concatenated with the upsampled states, which only match in size at such multiples (IF-II-L's
    5 levels need 16: traced at 24x16 its export failed)."""
    batch, h, w = LATENT_CASES[case]
    scale = max(1, 2 ** (len(cfg.block_out_channels) - 1) // 8)
    return batch, h * scale, w * scale


def unet_forward(names: list[str], sdxl: bool, lcm: bool, noise_level: bool = False):
    """``forward(model, *inputs) -> (out_sample,)``: the UNet called as the pipelines call it."""

    def forward(model, *args):
        feeds = dict(zip(names, args, strict=True))
        kwargs = {}
        if sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": feeds["text_embeds"], "time_ids": feeds["time_ids"]}
        if lcm:
            kwargs["timestep_cond"] = feeds["timestep_cond"]
        if noise_level:
            kwargs["class_labels"] = feeds["class_labels"]
        out = model(
            feeds["sample"],
            feeds["timestep"],
            encoder_hidden_states=feeds["encoder_hidden_states"],
            return_dict=False,
            **kwargs,
        )
        return (out[0],)

    return forward


def unet(module, *, time_ids_dim: int = 6, text_embeds_dim: int | None = None) -> Component:
    cfg = module.config
    sdxl = cfg.addition_embed_type == "text_time"
    lcm = cfg.time_cond_proj_dim is not None
    # the noise level of an upscaler's input image, one per sample: DeepFloyd IF's stage II embeds it as a
    # timestep, the SD x4 upscaler (IF's stage III) looks it up in a table of num_class_embeds
    noise_level = cfg.class_embed_type == "timestep" or cfg.num_class_embeds is not None
    inputs = {
        "sample": {0: "batch_size", 2: "height", 3: "width"},
        "timestep": {},
        "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
    }
    if sdxl:
        inputs["text_embeds"] = {0: "batch_size"}
        inputs["time_ids"] = {0: "batch_size"}
    if lcm:
        inputs["timestep_cond"] = {0: "batch_size"}
    if noise_level:
        inputs["class_labels"] = {0: "batch_size"}
    forward = unet_forward(list(inputs), sdxl, lcm, noise_level)

    def make_inputs(case: str) -> dict[str, np.ndarray]:
        batch, h, w = _unet_case(cfg, case)
        rng = np.random.default_rng(_stable_seed("unet", case))
        feeds = {
            "sample": _randn(rng, batch, cfg.in_channels, h, w),
            "timestep": np.array(rng.uniform(1, 999), dtype=np.float32),
            "encoder_hidden_states": _randn(rng, batch, TEXT_SEQ[case], cfg.encoder_hid_dim or cfg.cross_attention_dim),
        }
        if sdxl:
            feeds["text_embeds"] = _randn(rng, batch, text_embeds_dim)
            size = [h * 8, w * 8, 0, 0, h * 8, w * 8][:time_ids_dim]
            feeds["time_ids"] = np.tile(np.array(size, dtype=np.float32), (batch, 1))
        if lcm:
            feeds["timestep_cond"] = _randn(rng, batch, cfg.time_cond_proj_dim)
        if noise_level:
            feeds["class_labels"] = rng.integers(0, cfg.num_class_embeds or 1000, size=(batch,)).astype(np.int64)
        return feeds

    return Component(
        name="unet",
        kind="unet",
        module=module,
        inputs=inputs,
        outputs={"out_sample": {0: "batch_size", 2: "height", 3: "width"}},
        make_inputs=make_inputs,
        wrapper=_wrapper(forward)(module).eval(),
        rebuild=lambda other: unet(other, time_ids_dim=time_ids_dim, text_embeds_dim=text_embeds_dim),
    )


def sd3_transformer(module) -> Component:
    cfg = module.config
    inputs = {
        "hidden_states": {0: "batch_size", 2: "height", 3: "width"},
        "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
        "pooled_projections": {0: "batch_size"},
        "timestep": {0: "step"},
    }

    def forward(model, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        out = model(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            return_dict=False,
        )
        return (out[0],)

    def make_inputs(case: str) -> dict[str, np.ndarray]:
        batch, h, w = LATENT_CASES[case]
        rng = np.random.default_rng(_stable_seed("sd3", case))
        seq = TEXT_SEQ[case] + (256 if case == "a" else 16)  # CLIP tokens + T5 tokens
        return {
            "hidden_states": _randn(rng, batch, cfg.in_channels, h, w),
            "encoder_hidden_states": _randn(rng, batch, seq, cfg.joint_attention_dim),
            "pooled_projections": _randn(rng, batch, cfg.pooled_projection_dim),
            "timestep": rng.uniform(1, 999, size=(batch,)).astype(np.float32),
        }

    return Component(
        name="transformer",
        kind="sd3-transformer",
        module=module,
        inputs=inputs,
        outputs={"out_hidden_states": {0: "batch_size", 2: "height", 3: "width"}},
        make_inputs=make_inputs,
        wrapper=_wrapper(forward)(module).eval(),
        rebuild=sd3_transformer,
    )


def flux_image_ids(h: int, w: int) -> np.ndarray:
    """FluxPipeline._prepare_latent_image_ids for a (h, w) latent: (h/2 * w/2, 3) of (0, row, col)."""
    ids = np.zeros((h // 2, w // 2, 3), dtype=np.int64)
    ids[..., 1] = np.arange(h // 2)[:, None]
    ids[..., 2] = np.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


def flux_transformer(module) -> Component:
    cfg = module.config
    guidance = bool(cfg.guidance_embeds)
    inputs = {
        "hidden_states": {0: "batch_size", 1: "packed_height_width"},
        "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
        "pooled_projections": {0: "batch_size"},
        "timestep": {0: "step"},
        "img_ids": {0: "packed_height_width"},
        "txt_ids": {0: "sequence_length"},
    }
    if guidance:
        inputs["guidance"] = {0: "batch_size"}
    names = list(inputs)

    def forward(model, *args):
        feeds = dict(zip(names, args, strict=True))
        out = model(
            hidden_states=feeds["hidden_states"],
            encoder_hidden_states=feeds["encoder_hidden_states"],
            pooled_projections=feeds["pooled_projections"],
            timestep=feeds["timestep"],
            img_ids=feeds["img_ids"],
            txt_ids=feeds["txt_ids"],
            guidance=feeds.get("guidance"),
            return_dict=False,
        )
        return (out[0],)

    def make_inputs(case: str) -> dict[str, np.ndarray]:
        batch, h, w = LATENT_CASES[case]
        rng = np.random.default_rng(_stable_seed("flux", case))
        seq = 256 if case == "a" else 24  # T5 tokens
        feeds = {
            "hidden_states": _randn(rng, batch, (h // 2) * (w // 2), cfg.in_channels),
            "encoder_hidden_states": _randn(rng, batch, seq, cfg.joint_attention_dim),
            "pooled_projections": _randn(rng, batch, cfg.pooled_projection_dim),
            "timestep": rng.uniform(0.01, 1.0, size=(batch,)).astype(np.float32),  # pipeline passes t/1000
            "img_ids": flux_image_ids(h, w),
            "txt_ids": np.zeros((seq, 3), dtype=np.int64),
        }
        if guidance:
            feeds["guidance"] = np.full((batch,), 3.5, dtype=np.float32)
        return feeds

    return Component(
        name="transformer",
        kind="flux-transformer",
        module=module,
        inputs=inputs,
        outputs={"out_hidden_states": {0: "batch_size", 1: "packed_height_width"}},
        make_inputs=make_inputs,
        wrapper=_wrapper(forward)(module).eval(),
        rebuild=flux_transformer,
    )


# --- VAE -------------------------------------------------------------------------------------------


def _vae_scale(vae) -> int:
    if hasattr(vae.config, "temperal_downsample"):  # AutoencoderKLQwenImage: its spatial_compression_ratio
        from .qwen_image.vae import scale_factor

        return scale_factor(vae)
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _decode(model, latent_sample):
    return (model.decode(latent_sample, return_dict=False)[0],)


def _encode(model, sample):
    return (model.encode(sample, return_dict=False)[0].parameters,)


def vae_decoder(vae, forward=_decode) -> Component:
    """``forward(vae, latent_sample) -> (sample,)``: AutoencoderKL's decode, or another VAE's way to it."""
    down = _vae_scale(vae)
    channels = getattr(vae.config, "latent_channels", None) or vae.config.z_dim  # z_dim: AutoencoderKLQwenImage

    def make_inputs(case: str) -> dict[str, np.ndarray]:
        batch, h, w = LATENT_CASES[case]
        rng = np.random.default_rng(_stable_seed("vae_decoder", case))
        return {"latent_sample": _randn(rng, batch, channels, h, w)}

    return Component(
        name="vae_decoder",
        kind="vae-decoder",
        module=vae,
        parts=(vae.decoder, getattr(vae, "post_quant_conv", None)),
        inputs={"latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"}},
        outputs={
            "sample": {0: "batch_size", 2: f"latent_height * {down}", 3: f"latent_width * {down}"},
        },
        make_inputs=make_inputs,
        wrapper=_wrapper(forward)(vae).eval(),
    )


def vae_encoder(vae, forward=_encode) -> Component:
    """``forward(vae, sample) -> (latent_parameters,)``: the latent distribution's mean and log-variance."""
    down = _vae_scale(vae)

    def make_inputs(case: str) -> dict[str, np.ndarray]:
        batch, h, w = LATENT_CASES[case]
        rng = np.random.default_rng(_stable_seed("vae_encoder", case))
        return {"sample": rng.uniform(-1, 1, size=(batch, 3, h * down, w * down)).astype(np.float32)}

    return Component(
        name="vae_encoder",
        kind="vae-encoder",
        module=vae,
        parts=(vae.encoder, getattr(vae, "quant_conv", None)),
        inputs={"sample": {0: "batch_size", 2: "sample_height", 3: "sample_width"}},
        outputs={
            "latent_parameters": {
                0: "batch_size",
                2: f"sample_height / {down}",
                3: f"sample_width / {down}",
            }
        },
        make_inputs=make_inputs,
        wrapper=_wrapper(forward)(vae).eval(),
    )


# --- a pipeline's components -----------------------------------------------------------------------


def tokenizer_max_length(pipeline, encoder_name: str) -> int:
    tok = getattr(pipeline, encoder_name.replace("text_encoder", "tokenizer"), None)
    length = getattr(tok, "model_max_length", None)
    if not isinstance(length, int) or length > 4096:  # "very large" sentinel when unset
        module = getattr(pipeline, encoder_name)
        length = getattr(module.config, "max_position_embeddings", None) or 512
    return int(length)


def component_names(pipeline) -> list[str]:
    encoders = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")
    names = [n for n in encoders if getattr(pipeline, n, None)]
    names += [n for n in ("unet", "transformer") if getattr(pipeline, n, None) is not None]
    if getattr(pipeline, "vae", None) is None:  # DeepFloyd IF: pixel space
        return names
    return [*names, "vae_encoder", "vae_decoder"]


def unet_options(pipeline) -> dict:
    """What a pipeline's UNet graph takes besides the UNet: SDXL's time ids (5 with an aesthetic score) and
    pooled text embeddings."""
    aesthetics = bool(getattr(pipeline.config, "requires_aesthetics_score", False))
    te2 = getattr(pipeline, "text_encoder_2", None)
    proj = te2.config.projection_dim if te2 is not None else None
    return {"time_ids_dim": 5 if aesthetics else 6, "text_embeds_dim": proj}


def make(pipeline, name: str) -> Component:
    """The Component ``name`` of a loaded diffusers pipeline."""
    if name.startswith("text_encoder") and type(pipeline).__name__ == "HiDreamImagePipeline":
        from .hidream import text

        module = getattr(pipeline, name)
        if name == "text_encoder_4":
            return text.llama_component(name, module)
        if name == "text_encoder_3":  # HiDream passes T5 the attention mask, as IF does
            return text_encoder(name, module, text.MAX_SEQUENCE_LENGTH, attention_mask=True)
        return text_encoder(name, module, text.CLIP_MAX_LENGTH)
    if name.startswith("text_encoder"):
        module = getattr(pipeline, name)
        masked = type(pipeline).__name__ in MASKED_TEXT_PIPELINES
        return text_encoder(name, module, tokenizer_max_length(pipeline, name), attention_mask=masked)
    if name == "unet":
        return unet(pipeline.unet, **unet_options(pipeline))
    if name == "transformer":
        cls = type(pipeline.transformer).__name__
        if cls == "SD3Transformer2DModel":
            return sd3_transformer(pipeline.transformer)
        if cls == "FluxTransformer2DModel":
            return flux_transformer(pipeline.transformer)
        if cls == "HiDreamImageTransformer2DModel":
            from .hidream.transformer import transformer_component as hidream_transformer

            return hidream_transformer(pipeline.transformer)
        if cls == "QwenImageTransformer2DModel":
            from .qwen_image.transformer import transformer_component

            return transformer_component(pipeline.transformer)
        raise TypeError(f"no ONNX export for transformer class {cls}")
    if name in ("vae_decoder", "vae_encoder") and type(pipeline.vae).__name__ == "AutoencoderKLQwenImage":
        from . import qwen_image

        return qwen_image.vae_decoder(pipeline.vae) if name == "vae_decoder" else qwen_image.vae_encoder(pipeline.vae)
    if name == "vae_decoder":
        return vae_decoder(pipeline.vae)
    if name == "vae_encoder":
        return vae_encoder(pipeline.vae)
    raise KeyError(name)
