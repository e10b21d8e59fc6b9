"""Qwen-Image's VAE (diffusers' ``AutoencoderKLQwenImage``) as two 4-D, one-frame, stateless ONNX graphs.

The model is Wan's causal video VAE: 5-D tensors (batch, channels, frames, height, width), causal 3-D
convolutions and a feature cache that carries the last frames of one chunk into the next. An image is one
frame, the first chunk, and on the first chunk every cache entry is empty, so diffusers' path reduces to a
plain forward pass with no cache at all:

- a ``QwenImageCausalConv3d`` with no cached frames pads its input in front with ``kernel_t - 1`` zero frames,
  so on one frame only its last temporal tap ever meets data;
- the temporal up/downsamplers' ``time_conv`` is skipped on the first chunk ("Rep" / first-chunk branches of
  ``QwenImageResample``), exactly as it is when no cache is passed.

So the graphs call ``vae.decoder``/``vae.encoder`` without a cache (nothing in the graph is state), and they
are traced with each causal convolution rewritten as the 2-D convolution of its last temporal tap
(``_one_frame_convs``): the same sums without the zero frames, a third of the work and none of the padded
copies. Validation compares the graph with the unrewritten module (``Component.reference`` runs without it).

Graphs (docs: /work/notes/qwen-interface.md):

- ``vae_decoder``: ``latent_sample`` (batch, z_dim, h, w), the un-normalised latent (the engine computes
  ``latents / (1 / latents_std) + latents_mean`` first, as ``QwenImagePipeline`` does) → ``sample``
  (batch, 3, 8h, 8w) = ``vae.decoder(vae.post_quant_conv(z.unsqueeze(2)))[:, :, 0]``. That is
  ``vae.decode(z.unsqueeze(2))[0][:, :, 0]`` without its final clamp to [-1, 1]: the clamp changes nothing
  after ``VaeImageProcessor.postprocess``'s own clamp (``(x / 2 + 0.5).clamp(0, 1)``, bit for bit), and
  without it a tile is what diffusers' ``tiled_decode`` blends (its tiles are not clamped), so the engine's
  tiled decode is diffusers' — and the graph means what every other family's ``vae_decoder`` means
  (``AutoencoderKL.decode`` does not clamp either).
- ``vae_encoder``: ``sample`` (batch, 3, H, W) in [-1, 1] → ``latent_parameters`` (batch, 2·z_dim, H/8, W/8) =
  ``vae.encode(x.unsqueeze(2)).latent_dist.parameters[:, :, 0]`` (mean ‖ logvar; ``quant_conv`` included).
"""

from __future__ import annotations

import contextlib

from .. import components
from ..components import Component

CLASS_NAME = "AutoencoderKLQwenImage"

# Qwen/Qwen-Image's vae/config.json (also diffusers' AutoencoderKLQwenImage defaults: Wan 2.1's statistics).
# fmt: off
LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]
LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]
# fmt: on
# AutoencoderKLQwenImage.tile_sample_min_height/width: a fixed 256 px (not in its config), stride 192 (75%).
TILE_SAMPLE_SIZE = 256


def is_qwen_vae(vae) -> bool:
    return type(vae).__name__ == CLASS_NAME


def scale_factor(vae) -> int:
    """``spatial_compression_ratio``: 2 ** len(temperal_downsample) (8 for the real model)."""
    return 2 ** len(vae.config.temperal_downsample)


def block_out_channels(vae) -> list[int]:
    """The encoder's channels per level (base_dim x dim_mult): what engine/memory.py's VAE estimate and
    engine/vae.Tiling read as ``vae_block_out_channels`` (its length - 1 = the downsampling steps)."""
    return [int(vae.config.base_dim * m) for m in vae.config.dim_mult]


def config_keys(vae) -> dict:
    """The manifest config keys the engine reads for this VAE (exporters/main.pipeline_config merges them for
    family "qwen-image" in place of the AutoencoderKL ones it reads from ``vae.config``): the latent layout, the
    per-channel statistics engine/vae.Vae un-normalises with (no scaling factor or shift: 1.0 and None), and
    the layout engine/memory.py estimates with and engine/vae.Tiling tiles by (256 px tiles, as diffusers')."""
    return {
        "vae_scale_factor": scale_factor(vae),
        "latent_channels": int(vae.config.z_dim),
        "vae_latents_mean": [float(v) for v in vae.config.latents_mean],
        "vae_latents_std": [float(v) for v in vae.config.latents_std],
        "vae_scaling_factor": 1.0,
        "vae_shift_factor": None,
        "vae_sample_size": TILE_SAMPLE_SIZE,
        "vae_block_out_channels": block_out_channels(vae),
        "vae_mid_block_attention": True,
    }


def tiny_vae(seed: int = 0):
    """A tiny seeded ``AutoencoderKLQwenImage`` with the real model's layout: z_dim 16, the real
    latents_mean/std, four levels and three spatial downsamplings (scale factor 8), the real temporal flags
    (unused on one frame), a mid-block attention; only base_dim and the residual blocks are cut. fp32, eval."""
    import torch
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        latents_mean=list(LATENTS_MEAN),
        latents_std=list(LATENTS_STD),
    )
    # diffusers initialises RMS-norm gains to one and biases to zero; perturb every parameter a little so the
    # norms, biases and shortcuts are exercised as trained weights would (still seeded).
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae.float().eval()


# --- one frame: the causal 3-D convolutions as 2-D ones ---------------------------------------------------


def _one_frame_forward(original):
    def forward(self, x, cache_x=None):
        import torch
        import torch.nn.functional as F

        exporting = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        pad_w, _, pad_h, _, pad_front, pad_back = self._padding
        kt = self.kernel_size[0]
        if (
            not exporting
            or cache_x is not None
            or x.shape[2] != 1
            or pad_back != 0
            or pad_front != kt - 1
            or self.stride[0] != 1
            or self.dilation[0] != 1
        ):
            return original(self, x, cache_x)
        # one frame behind kt - 1 zero frames: one output frame, which only the last temporal tap sees
        y = F.conv2d(x[:, :, 0], self.weight[:, :, -1], self.bias, self.stride[1:], (pad_h, pad_w), self.dilation[1:])
        return y.unsqueeze(2)

    return forward


def _nearest_forward(original):
    def forward(self, x):
        import torch
        import torch.nn.functional as F

        exporting = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        scale = self.scale_factor if isinstance(self.scale_factor, tuple) else (self.scale_factor,) * 2
        if not exporting or self.mode != "nearest-exact" or any(float(s) != int(s) for s in scale):
            return original(self, x)
        # at an integer scale nearest-exact's source pixel floor((i + 0.5) / s) is nearest's floor(i / s)
        return F.interpolate(x.float(), scale_factor=scale, mode="nearest").type_as(x)

    return forward


@contextlib.contextmanager
def _one_frame_convs():
    """While tracing: each ``QwenImageCausalConv3d`` on one uncached frame is the 2-D convolution of its last
    temporal tap (the other taps multiply the causal zero padding), and the decoder's 2x ``nearest-exact``
    upsampling (no TorchScript export at any opset) is ``nearest``, the same pixels at an integer scale.
    Outside a trace nothing changes."""
    from diffusers.models.autoencoders import autoencoder_kl_qwenimage as qwen

    conv, upsample = qwen.QwenImageCausalConv3d, qwen.QwenImageUpsample
    originals = conv.forward, upsample.forward
    conv.forward = _one_frame_forward(originals[0])
    upsample.forward = _nearest_forward(originals[1])
    try:
        yield
    finally:
        conv.forward, upsample.forward = originals


def _decode(model, latent_sample):
    with _one_frame_convs():
        z = model.post_quant_conv(latent_sample.unsqueeze(2))
        return (model.decoder(z)[:, :, 0],)


def _encode(model, sample):
    with _one_frame_convs():
        return (model.quant_conv(model.encoder(sample.unsqueeze(2)))[:, :, 0],)


def vae_decoder(vae) -> Component:
    return components.vae_decoder(vae, forward=_decode)


def vae_encoder(vae) -> Component:
    return components.vae_encoder(vae, forward=_encode)
