"""``tiny:<family>``: tiny, randomly initialised pipelines built from the real diffusers/transformers classes.

Same classes, same wiring and the same tokenizers as the real checkpoints (the real CLIP vocabulary, so
``vocab_size`` is 49,408), only narrow and shallow, and seeded: ``build("sdxl")`` returns the same weights
every time, so a test can rebuild the PyTorch pipeline an export came from and compare against it.
Configs follow diffusers' own ``get_dummy_components`` test fixtures, with the real models' scaling
factors, latent channels, patch sizes and scheduler configs.
"""

from __future__ import annotations

from .errors import ExportError
from .families import TINY_SOURCES
from .vocab import CLIP_VOCAB_SIZE, clip_tokenizer, t5_tokenizer, t5_vocab_size

SEED = 0
CLIP_HIDDEN = 32
T5_HIDDEN = 64


def tiny_names() -> list[str]:
    return list(TINY_SOURCES)


def _seed(offset: int = 0) -> None:
    import torch

    torch.manual_seed(SEED + offset)


def _clip_config(num_hidden_layers: int, hidden_act: str = "quick_gelu", positions: int = 77):
    from transformers import CLIPTextConfig

    # bos/eos/pad ids 0/2/1 as in openai/clip-vit-large-patch14's config.json (eos id 2 selects the
    # argmax pooling that the real checkpoints use).
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=CLIP_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        max_position_embeddings=positions,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        projection_dim=CLIP_HIDDEN,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def _clip_l(seed: int, with_projection: bool = False, positions: int = 77):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    _seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(_clip_config(num_hidden_layers=3, positions=positions)).eval()


def _clip_g(seed: int, positions: int = 77):
    from transformers import CLIPTextModelWithProjection

    _seed(seed)
    return CLIPTextModelWithProjection(_clip_config(num_hidden_layers=4, hidden_act="gelu", positions=positions)).eval()


def _t5(seed: int):
    from transformers import T5Config, T5EncoderModel

    _seed(seed)
    config = T5Config(
        vocab_size=t5_vocab_size(),
        d_model=T5_HIDDEN,
        d_kv=16,
        d_ff=96,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def _vae(seed: int, latent_channels: int, scaling_factor: float, shift_factor: float | None = None):
    from diffusers import AutoencoderKL

    _seed(seed)
    extra = {}
    if shift_factor is not None:  # SD3/FLUX VAEs: 16 channels, no quant convs, a shift
        extra = {"shift_factor": shift_factor, "use_quant_conv": False, "use_post_quant_conv": False}
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=scaling_factor,
        **extra,
    ).eval()


def _scheduler(model_id: str):
    import diffusers

    import registry

    config = dict(registry.get(model_id).scheduler)
    cls = getattr(diffusers, config.pop("_class_name"))
    return cls.from_config(config)


def _unet_sd15(seed: int, time_cond_proj_dim: int | None = None, in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    _seed(seed)
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CLIP_HIDDEN,
        attention_head_dim=(2, 4),
        norm_num_groups=32,
        time_cond_proj_dim=time_cond_proj_dim,
    ).eval()


def _unet_sdxl(seed: int):
    from diffusers import UNet2DConditionModel

    _seed(seed)
    addition_time_embed_dim = 8
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        transformer_layers_per_block=(1, 2),
        # 6 time ids, each embedded to addition_time_embed_dim, + text_encoder_2's projection
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + CLIP_HIDDEN,
        cross_attention_dim=2 * CLIP_HIDDEN,  # CLIP-L and CLIP-G hidden states, concatenated
        norm_num_groups=32,
    ).eval()


def _build_sd15(lcm: bool = False, inpaint: bool = False):
    """SD 1.5's pipeline, or LCM's: the same wiring, plus the UNet's guidance embedding and LCM's scheduler;
    or SD 1.5 inpainting's: the same wiring with a 9-channel UNet input (4 noisy latent channels, 1 mask,
    4 masked-image latent channels, concatenated in that order by StableDiffusionInpaintPipeline)."""
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline

    if lcm and inpaint:
        raise ValueError("no tiny LCM inpainting pipeline")
    pipeline_class = StableDiffusionPipeline
    if lcm:
        pipeline_class = LatentConsistencyModelPipeline
    elif inpaint:
        pipeline_class = StableDiffusionInpaintPipeline
    return pipeline_class(
        vae=_vae(1, 4, 0.18215),
        text_encoder=_clip_l(2),
        tokenizer=clip_tokenizer(),
        unet=_unet_sd15(3, time_cond_proj_dim=32 if lcm else None, in_channels=9 if inpaint else 4),
        scheduler=_scheduler("lcm" if lcm else "sd15"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl():
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=_vae(1, 4, 0.13025),
        text_encoder=_clip_l(2),
        text_encoder_2=_clip_g(4),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        unet=_unet_sdxl(3),
        scheduler=_scheduler("sdxl"),
    )


def _build_sd3():
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    _seed(3)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=T5_HIDDEN,  # T5's hidden size; CLIP-L+G (2 x 32) are padded to it
        caption_projection_dim=32,  # = heads x head dim
        pooled_projection_dim=2 * CLIP_HIDDEN,  # CLIP-L and CLIP-G text_embeds, concatenated
        out_channels=16,
        pos_embed_max_size=64,
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=_scheduler("sd3-medium"),
        vae=_vae(1, 16, 1.5305, shift_factor=0.0609),
        text_encoder=_clip_l(2, with_projection=True),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_clip_g(4),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        text_encoder_3=_t5(5),
        tokenizer_3=t5_tokenizer(),
    )


def _build_flux(guidance_embeds: bool):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    _seed(3)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2x2
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_HIDDEN,
        pooled_projection_dim=CLIP_HIDDEN,  # CLIP-L pooler_output
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    ).eval()
    return FluxPipeline(
        scheduler=_scheduler("flux-dev" if guidance_embeds else "flux-schnell"),
        vae=_vae(1, 16, 0.3611, shift_factor=0.1159),
        text_encoder=_clip_l(2),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_t5(5),
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )


def _build_qwen_image():
    from diffusers import QwenImagePipeline

    from .qwen_image import text, transformer, vae

    tokenizer = text.tiny_tokenizer()
    encoder = text.tiny_text_encoder(2, vocab_size=len(tokenizer))
    return QwenImagePipeline(
        scheduler=_scheduler("qwen-image"),
        vae=vae.tiny_vae(1),
        text_encoder=encoder,
        tokenizer=tokenizer,
        transformer=transformer.tiny_transformer(3, joint_attention_dim=encoder.config.text_config.hidden_size),
    )


def _build_hidream(model_id: str):
    """HiDream-I1 (``model_id``: hidream-i1, -dev or -fast: the scheduler differs). Its CLIPs read 128 tokens
    (the real ones are long-context CLIPs of 248 positions) and ``default_sample_size`` is 16 latent pixels, where
    the real pipeline's is 128: the pipeline rescales every request to that area, which for the tiny VAE (scale 2)
    is a 32x32 image of 64 tokens."""
    from diffusers import HiDreamImagePipeline

    from .hidream import text, transformer

    tokenizer_4 = text.tiny_llama_tokenizer()
    pipeline = HiDreamImagePipeline(
        scheduler=_scheduler(model_id),
        vae=_vae(1, 16, 0.3611, shift_factor=0.1159),  # FLUX's VAE
        text_encoder=_clip_l(2, with_projection=True, positions=text.CLIP_MAX_LENGTH),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_clip_g(4, positions=text.CLIP_MAX_LENGTH),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        text_encoder_3=_t5(5),
        tokenizer_3=t5_tokenizer(),
        text_encoder_4=text.tiny_llama(6, len(tokenizer_4)),
        tokenizer_4=tokenizer_4,
        transformer=transformer.tiny_transformer(3, t5_dim=T5_HIDDEN, llama_dim=48, pooled_dim=2 * CLIP_HIDDEN),
    )
    pipeline.default_sample_size = TINY_HIDREAM_SAMPLE_SIZE
    return pipeline


TINY_HIDREAM_SAMPLE_SIZE = 16

_BUILDERS = {
    "sd15": _build_sd15,
    "sdxl": _build_sdxl,
    "lcm": lambda: _build_sd15(lcm=True),
    "sd15-inpaint": lambda: _build_sd15(inpaint=True),
    "sd3": _build_sd3,
    "flux-schnell": lambda: _build_flux(guidance_embeds=False),
    "flux-dev": lambda: _build_flux(guidance_embeds=True),
    "qwen-image": _build_qwen_image,
    "hidream-i1": lambda: _build_hidream("hidream-i1"),
    "hidream-i1-dev": lambda: _build_hidream("hidream-i1-dev"),
    "hidream-i1-fast": lambda: _build_hidream("hidream-i1-fast"),
}


def build(name: str):
    """The tiny pipeline ``tiny:<name>`` (fp32, eval mode, deterministic)."""
    if name not in _BUILDERS:
        known = ", ".join(f"tiny:{n}" for n in _BUILDERS)
        raise ExportError(f"unknown tiny family 'tiny:{name}'; use one of {known}")
    pipeline = _BUILDERS[name]()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
