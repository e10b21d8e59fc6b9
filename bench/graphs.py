"""Derived UNet/VAE graphs for the tuning candidates and the fast precision modes, built once from the
exported fp32 graphs and cached beside them (``$STEPWISE_HOME/bench/random-<family>-graphs/<name>/``)."""

from __future__ import annotations

from pathlib import Path

# Fusions of onnxruntime.transformers' UNet optimizer that have CPU kernels. GroupNorm/SkipGroupNorm,
# NhwcConv, BiasSplitGelu, BiasAdd and packed QKV/KV attention are CUDA-only contrib ops.
CPU_UNET_FUSIONS_OFF = (
    "enable_group_norm",
    "enable_skip_group_norm",
    "enable_nhwc_conv",
    "enable_bias_splitgelu",
    "enable_bias_add",
    "enable_packed_qkv",
    "enable_packed_kv",
)


def _target(work: Path, name: str, component: str) -> Path:
    return work / name / component / "model.onnx"


def fused_unet(source: Path, work: Path, progress=print) -> Path:
    """The UNet after onnxruntime.transformers' UNet fusions that run on CPU (attention, LayerNorm, Gelu)."""
    out = _target(work, "fused", "unet")
    if out.is_file():
        return out
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    progress(f"  fusing {source} (onnxruntime.transformers, model_type=unet, CPU fusions)")
    options = FusionOptions("unet")
    for name in CPU_UNET_FUSIONS_OFF:
        setattr(options, name, False)
    options.use_multi_head_attention = True
    optimized = optimize_model(str(source), model_type="unet", optimization_options=options, opt_level=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    optimized.save_model_to_file(str(out), use_external_data_format=True)
    progress(f"    fused ops: {optimized.get_fused_operator_statistics()}")
    return out


def dynamic_int8(
    source: Path, work: Path, name: str, op_types: tuple[str, ...], component: str, progress=print
) -> Path:
    """Weights int8 (per channel), activations uint8 quantized at run time: U8S8, which VNNI executes."""
    out = _target(work, name, component)
    if out.is_file():
        return out
    from onnxruntime.quantization import QuantType, quantize_dynamic

    progress(f"  quantizing {source} dynamically to int8 ({', '.join(op_types)})")
    out.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(
        str(source),
        str(out),
        op_types_to_quantize=list(op_types),
        weight_type=QuantType.QInt8,
        per_channel=True,
        use_external_data_format=True,
    )
    return out
