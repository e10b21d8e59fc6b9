"""Exporters: a diffusers checkpoint (hub repo id, pipeline folder or ``tiny:<family>``) → ONNX folder.

``export()`` is the one entry point (``stepwise export`` calls it); ``ExportError`` is the one exception
it raises for anything the caller can fix. ``build_tiny(name)`` rebuilds a ``tiny:<name>`` PyTorch
pipeline (deterministic), the reference the tests compare exported graphs against. docs/exporting.md
has the how-to; docs/design.md the folder layout, graph names and manifest.

Heavy imports (torch, diffusers, optimum) happen inside the functions, not when this package is
imported.
"""

from __future__ import annotations

from .errors import ExportError
from .families import PIPELINE_FAMILIES, TINY_SOURCES


def export(
    source: str,
    *,
    out=None,
    model_id: str | None = None,
    unet: str | None = None,
    lora: str | None = None,
    lora_scale: float = 1.0,
    opset: int = 17,
    use_optimum: bool | None = None,
    weights: str | None = None,
    vae_weights: str = "fp32",
    text_encoder_weights: str | None = None,
    fuse: bool = True,
    stage_2: str | None = None,
    stage_3: str | None = None,
    cache_graphs: bool = False,
    progress=print,
):
    """Export SOURCE (hub repo id, diffusers pipeline folder or ``tiny:<family>``) to a validated ONNX folder.

    ``out``: the folder (default: ``registry.models_home() / (model_id or a name from the source)``);
    ``model_id``: tie the export to a registry entry (its family must match; its ``parts`` apply);
    ``unet``/``lora``: ``FILE`` or ``REPO:FILE``; ``use_optimum``: None = optimum when importable;
    ``weights``: the denoiser's precision, ``fp32``, ``int8`` or ``int4``: for a UNet int8 is static int8
    convolutions calibrated on the model's own sampling and dynamic int8 MatMuls, int4 4-bit block-wise MatMul
    weights; for the SD 3 and FLUX transformers (exported by streaming, never loaded whole) both are
    block-wise weight-only ``MatMulNBits`` (``exporters/weights.py``); None: the family's default (fp32,
    Qwen-Image int4);
    ``text_encoder_weights``: T5-XXL's (SD 3, FLUX) or Qwen2.5-VL's (Qwen-Image), ``fp32``, ``int8`` or
    ``int4``, ``MatMulNBits`` too; None: the family's default (fp32, Qwen-Image int4);
    ``vae_weights``: the VAE decoder's, ``fp32`` or ``int8`` (static int8 convolutions calibrated on the
    pipeline's own sampled latents; UNet pipelines);
    ``fuse``: rewrite a UNet's attention for ONNX Runtime's CPU kernels (flash attention);
    ``stage_2``/``stage_3``: a cascade's later stages, folders or hub repos (DeepFloyd IF: SOURCE is stage I,
    ``stage_2`` its IFSuperResolutionPipeline; stage III is not supported yet);
    ``cache_graphs``: also write the transformer as the graphs step caching runs (FLUX, SD 3; exporters/split.py);
    ``progress``: called with one line per stage (None for silence). Returns the folder (a Path).
    Raises ExportError, one line naming the problem and the fix.
    """
    from .main import export as _export

    return _export(
        source,
        out=out,
        model_id=model_id,
        unet=unet,
        lora=lora,
        lora_scale=lora_scale,
        opset=opset,
        use_optimum=use_optimum,
        weights=weights,
        vae_weights=vae_weights,
        text_encoder_weights=text_encoder_weights,
        fuse=fuse,
        stage_2=stage_2,
        stage_3=stage_3,
        cache_graphs=cache_graphs,
        progress=progress,
    )


def build_tiny(name: str):
    """The ``tiny:<name>`` diffusers pipeline, fp32, seeded: the same weights on every call."""
    from .tiny import build

    return build(name)


__all__ = ["PIPELINE_FAMILIES", "TINY_SOURCES", "ExportError", "build_tiny", "export"]
