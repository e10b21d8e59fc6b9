"""``tiny:deepfloyd-if``: stage I (``IFPipeline``) and stage II (``IFSuperResolutionPipeline``), tiny and seeded.

The UNets are configured as diffusers' own IF test fixtures configure them (``tests/pipelines/deepfloyd_if``):
ResNet down/up-sampling blocks, simple cross-attention with added key/values, the T5 states projected by
``encoder_hid_dim`` and pooled into the time embedding (``addition_embed_type="text"``), 6 output channels for
learned-range variance; stage II takes the upscaled stage I image as 3 more input channels and its noise level
through ``class_embed_type="timestep"``. The T5 encoder is the tiny T5 of SD 3 and FLUX, its tokenizer theirs.
Stage I is 16x16, stage II 32x32 (the real ones 64 and 256): small enough for tests, and still a 2x upscale.

Stage III is a ``StableDiffusionUpscalePipeline`` as diffusers' own upscale test fixture builds one
(``tests/pipelines/stable_diffusion_2/test_stable_diffusion_upscale.py``), narrower: a UNet of 7 input channels
(4 latent + 3 image) with the noise level as a class embedding (``num_class_embeds``, 1000 as the real one so
noise level 100 is in range), linear-projection cross-attention (the first level cross-attention only, as the
real one's first three), a x4 VAE (3 levels) with the real scaling factor 0.08333, the tiny CLIP text encoder.
Its schedulers are the real checkpoint's (below). Its 32x32 input is upscaled to 128x128.
"""

from __future__ import annotations

STAGE_1_SIZE = 16
STAGE_2_SIZE = 32
# the diffusers fixtures' scheduler: the real IF-I config with sample_max_value 1.0
STAGE_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "thresholding": True,
    "dynamic_thresholding_ratio": 0.95,
    "sample_max_value": 1.0,
    "prediction_type": "epsilon",
    "variance_type": "learned_range",
}
NOISING_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "beta_start": 0.0001,
    "beta_end": 0.02,
}


# stabilityai/stable-diffusion-x4-upscaler's scheduler/ and low_res_scheduler/ configs (the hub's files; the
# low-res one as diffusers' single_file_utils spells it for this pipeline): DDIM with v-prediction, and DDPM noising
UPSCALER_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "v_prediction",
}
UPSCALER_NOISING_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "clip_sample": True,
    "prediction_type": "epsilon",
    "variance_type": "fixed_small",
}


def _unet(seed: int, stage: int, text_dim: int):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    common = dict(
        block_out_channels=[32, 64],
        down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
        out_channels=6,
        cross_attention_dim=32,
        encoder_hid_dim=text_dim,
        attention_head_dim=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
    )
    if stage == 1:
        return UNet2DConditionModel(sample_size=STAGE_1_SIZE, layers_per_block=1, in_channels=3, **common).eval()
    return UNet2DConditionModel(
        sample_size=STAGE_2_SIZE,
        layers_per_block=[1, 2],
        in_channels=6,
        class_embed_type="timestep",
        mid_block_scale_factor=1.414,
        time_embedding_act_fn="gelu",
        time_embedding_dim=32,
        **common,
    ).eval()


def _ddpm(config: dict):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**config)


def build_cascade():
    """(stage I ``IFPipeline``, stage II ``IFSuperResolutionPipeline``): fp32, eval mode, the same weights every
    call. Stage II has no text encoder of its own: stage I's T5 states condition it, as diffusers' IF docs load it
    (``text_encoder=None``)."""
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    from ..tiny import T5_HIDDEN, _t5
    from ..vocab import t5_tokenizer

    stage_1 = IFPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=_t5(5),
        unet=_unet(3, 1, T5_HIDDEN),
        scheduler=_ddpm(STAGE_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        requires_safety_checker=False,
    )
    stage_2 = IFSuperResolutionPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=None,
        unet=_unet(6, 2, T5_HIDDEN),
        scheduler=_ddpm(STAGE_SCHEDULER),
        image_noising_scheduler=_ddpm(NOISING_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        requires_safety_checker=False,
    )
    for pipe in (stage_1, stage_2):
        pipe.set_progress_bar_config(disable=True)
    return stage_1, stage_2


def build_stage_3():
    """Stage III, the x4 upscaler (``StableDiffusionUpscalePipeline``): fp32, eval mode, the same weights every
    call; its own CLIP text encoder and tokenizer (the prompt conditions it again, as diffusers' IF docs call it
    with ``prompt=``)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel

    from ..tiny import CLIP_HIDDEN, _clip_l
    from ..vocab import clip_tokenizer

    torch.manual_seed(11)
    unet = UNet2DConditionModel(
        sample_size=STAGE_2_SIZE,
        in_channels=7,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CLIP_HIDDEN,
        attention_head_dim=8,
        use_linear_projection=True,
        only_cross_attention=(True, False),
        num_class_embeds=1000,
        norm_num_groups=32,
    ).eval()
    torch.manual_seed(12)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=128,
        scaling_factor=0.08333,
    ).eval()
    config = dict(UPSCALER_SCHEDULER)
    del config["_class_name"]
    stage_3 = StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=_clip_l(13),
        tokenizer=clip_tokenizer(),
        unet=unet,
        low_res_scheduler=_ddpm(UPSCALER_NOISING_SCHEDULER),
        scheduler=DDIMScheduler(**config),
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        max_noise_level=350,
    )
    stage_3.set_progress_bar_config(disable=True)
    return stage_3
