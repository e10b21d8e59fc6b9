"""``tiny:deepfloyd-if``: stage I (``IFPipeline``) and stage II (``IFSuperResolutionPipeline``), tiny and seeded.

The UNets are configured as diffusers' own IF test fixtures configure them (``tests/pipelines/deepfloyd_if``):
ResNet down/up-sampling blocks, simple cross-attention with added key/values, the T5 states projected by
``encoder_hid_dim`` and pooled into the time embedding (``addition_embed_type="text"``), 6 output channels for
learned-range variance; stage II takes the upscaled stage I image as 3 more input channels and its noise level
through ``class_embed_type="timestep"``. The T5 encoder is the tiny T5 of SD 3 and FLUX, its tokenizer theirs.
Stage I is 16x16, stage II 32x32 (the real ones 64 and 256): small enough for tests, and still a 2x upscale.
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
