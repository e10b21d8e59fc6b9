"""What a model needs in memory per weight format, before anything is exported: `stepwise models`' column.

Weights are the registry's parameter counts times the bytes a parameter takes in each format. The formats
apply to the denoiser and to the big text encoder, T5-XXL or Qwen2.5-VL (``--weights``,
``--text-encoder-weights``; at most int8, see ``T5_FORMAT``); CLIP and the VAE stay fp32.
int8 and int4 are block-wise with a float32 scale per 128 weights (exporters/weights.py): 8.25 and 4.25 bits.
A UNet's int8 keeps ~1 byte a weight (int8 convolutions per output channel, 8-bit MatMulNBits Linears); its
int4 only shrinks the MatMuls, so no figure is given.

The need is the phased policy's peak at the model's default size (engine/memory.py): the largest of the
text-encoder phase, the denoiser phase (its weights plus ``activations_mb["denoiser"]``) and the decode phase
(the VAE's weights plus ``activations_mb["decode"]``, untiled), plus the runtime's overhead. The activations
are the engine's own estimate (``engine.memory.activation_mb``) for each model's real config at that size,
with the batch its guidance runs and the attention fused, as exports now are. Measured peaks against these
figures are in docs/benchmarks.md ("Big models at full size").

A cascade (DeepFloyd IF) has no VAE: its phases are the text encoder and each stage's UNet, the later ones
(``unet_2``) with their activations at their own stage's size (``activations_mb["denoiser_2"]``: IF-II-L at
256x256), as engine/cascade.py plans them. Its optional stage III (the x4 upscaler, exported with
``--stage-3``) carries its own figures in its stage entry (``params_m``, ``activations_mb``) and adds three
phases: its CLIP (fp32 in every column, as exported), its UNet (the column's format, 256x256 latents, batch 2)
and its VAE decode to 1024x1024 in tiles (the untiled decode's 65,536-token attention needs ~34 GB; the engine
tiles wherever that is not free). The need is the largest phase of either export, with stage III or without:
stage III's phases stay under stage I's (docs/benchmarks.md), so the figure is the same for both.

Where a full-size measurement showed the estimate more than 25% off, the model's ``measured_mb`` for that
format replaces it. No model has one now: IF's int8 had (its stage I's session peaked at 9,552 MB against
5,260 estimated) until the exporter made each int8 convolution's dequantization wait for its input; measured
again, 5,928 MB (estimate -11%).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .models import Model

BYTES_PER_PARAM = {"fp32": 4.0, "int8": 1.0 + 4 / 128, "int4": 0.5 + 4 / 128}
FORMATS = tuple(BYTES_PER_PARAM)
WEIGHTS_FACTOR = {"fp32": 1.05, "int8": 1.05, "int4": 1.25}  # once loaded, of the file size (engine/memory.py)
OVERHEAD_MB = 200.0
# the text encoders the formats apply to: T5-XXL's encoder (4,762 M), Qwen-Image's Qwen2.5-VL (8,292 M with the
# vision tower and output head the export leaves out: an overestimate of ~1.2 GB in int8, never the peak)
BIG_TEXT_ENCODER_M = 4000
# T5-XXL's format in each column: int4 T5 fails the export's 10 dB floor at full width (7.0 dB), so the int4
# column is the int4 transformer with int8 T5, as docs/exporting.md advises
T5_FORMAT = {"fp32": "fp32", "int8": "int8", "int4": "int8"}


def _mb(params_m: float, fmt: str) -> float:
    return params_m * 1e6 * BYTES_PER_PARAM[fmt] * WEIGHTS_FACTOR[fmt] / 2**20


def need_mb(model: Model, fmt: str) -> float | None:
    """The phased peak at the default size with the denoiser and T5 in ``fmt``; None when not meaningful."""
    if model.measured_mb and fmt in model.measured_mb:
        return float(model.measured_mb[fmt])
    denoiser = "unet" if "unet" in model.params_m else "transformer"
    if denoiser == "unet" and fmt == "int4" or model.activations_mb is None:
        return None
    t5 = T5_FORMAT[fmt]
    encoders = [p for name, p in model.params_m.items() if name.startswith("text_encoder")]
    text = sum(_mb(p, t5 if p >= BIG_TEXT_ENCODER_M else "fp32") for p in encoders)
    phases = [text, _mb(model.params_m[denoiser], fmt) + model.activations_mb["denoiser"]]
    if "unet_2" in model.params_m:  # a cascade's stage II
        phases.append(_mb(model.params_m["unet_2"], fmt) + model.activations_mb["denoiser_2"])
    if "vae" in model.params_m:
        phases.append(_mb(model.params_m["vae"], "fp32") + model.activations_mb["decode"])
    for stage in model.stages:  # a cascade's optional stage with its own components (IF's x4 upscaler)
        if "params_m" in stage:
            params, act = stage["params_m"], stage["activations_mb"]
            phases.append(_mb(params["text_encoder"], "fp32") + act["text_encoder"])
            phases.append(_mb(params["unet"], fmt) + act["denoiser"])
            phases.append(_mb(params["vae_decoder"], "fp32") + act["decode"])
    return max(phases) + OVERHEAD_MB
