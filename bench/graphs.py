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


def _patch_num_heads() -> None:
    """onnxruntime 1.32's UNet attention fusion calls int() on a shape-[1] array, which NumPy 2 refuses;
    the same lookup with .item()."""
    import importlib
    import sys

    import numpy as np
    import onnxruntime.transformers.optimizer  # noqa: F401 - puts its folder on sys.path, as it imports itself

    importlib.import_module("fusion_attention_unet")  # the top-level copy the UNet optimizer uses

    def get_num_heads(self, reshape_q, is_torch2: bool = False) -> int:
        if is_torch2:
            parent = self.model.get_parent(reshape_q, 1)
            if parent and parent.op_type == "Concat" and len(parent.input) == 4:
                value = self.model.get_constant_value(parent.input[2])
                if isinstance(value, np.ndarray) and value.size == 1:
                    return max(int(value.reshape(-1)[0]), 0)
            return 0
        value = self.model.get_constant_value(reshape_q.input[1])
        if isinstance(value, np.ndarray) and list(value.shape) == [4]:
            return max(int(value[2]), 0)
        return 0

    # the optimizer imports the fusion module both as a package module and top-level: patch every copy
    for name, module in list(sys.modules.items()):
        if name.endswith("fusion_attention_unet") and hasattr(module, "FusionAttentionUnet"):
            module.FusionAttentionUnet.get_num_heads = get_num_heads


def fused_unet(source: Path, work: Path, progress=print) -> Path:
    """The UNet after onnxruntime.transformers' UNet fusions that run on CPU (attention, LayerNorm, Gelu)."""
    out = _target(work, "fused", "unet")
    if out.is_file():
        return out
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    _patch_num_heads()
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
        # contrib ops (the fused graph's Attention) leave some types to guess; they are all float
        extra_options={"DefaultTensorType": 1},
    )
    return out


def split_self_attention(source: Path, work: Path, progress=print) -> Path:
    """The fused UNet with every self-attention ``Attention`` node (packed QKV weight, no flash kernel on
    CPU) rewritten as three MatMuls into ``MultiHeadAttention``, whose CPU kernel runs flash attention:
    the (B, heads, 4096, 4096) score tensor is never materialised."""
    out = _target(work, "fused-mha", "unet")
    if out.is_file():
        return out
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    progress(f"  splitting self-attention of {source} into MatMuls + MultiHeadAttention")
    model = onnx.load(str(source))  # with weights: the packed QKV weight is cut into three
    inits = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.op_type != "Attention" or node.domain != "com.microsoft":
            nodes.append(node)
            continue
        heads = next(a.i for a in node.attribute if a.name == "num_heads")
        weight = numpy_helper.to_array(inits[node.input[1]])  # (C, 3·C): q, k, v columns side by side
        c_out = weight.shape[1] // 3
        has_bias = len(node.input) > 2 and node.input[2] and np.any(numpy_helper.to_array(inits[node.input[2]]))
        names = []
        for i, part in enumerate("qkv"):
            w_name = f"{node.name}_{part}_weight"
            model.graph.initializer.append(
                numpy_helper.from_array(np.ascontiguousarray(weight[:, i * c_out : (i + 1) * c_out]), w_name)
            )
            names.append(f"{node.name}_{part}")
            nodes.append(
                helper.make_node("MatMul", [node.input[0], w_name], [names[-1]], name=f"{node.name}_{part}_mm")
            )
        inputs = names + ([node.input[2]] if has_bias else [])
        nodes.append(
            helper.make_node(
                "MultiHeadAttention",
                inputs,
                [node.output[0]],
                name=node.name + "_mha",
                domain="com.microsoft",
                num_heads=heads,
            )
        )
    used = {i for n in nodes for i in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out), save_as_external_data=True, location="model.onnx.data")
    return out


def unet_calibration_samples(folder: Path, width: int, height: int, prompt: str, count: int = 4) -> list[dict]:
    """UNet inputs for static-quantization calibration: the benchmark prompt's text states (negative,
    prompt) and the seeded initial noise, scaled as the scheduler feeds it, at ``count`` timesteps spread
    over the schedule."""
    import json

    import numpy as np
    import onnxruntime as ort

    import schedulers
    from engine.tokenize import PromptTokenizer

    text = ort.InferenceSession(str(folder / "text_encoder" / "model.onnx"), providers=["CPUExecutionProvider"])
    tokenizer = PromptTokenizer(folder / "tokenizer")
    states = np.concatenate([text.run(["last_hidden_state"], {"input_ids": tokenizer(t).ids})[0] for t in ("", prompt)])
    scheduler = schedulers.from_config(json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))
    scheduler.set_timesteps(count)
    noise = np.random.default_rng(0).standard_normal((1, 4, height // 8, width // 8), dtype=np.float32)
    samples = []
    for t in scheduler.timesteps[:count]:
        x = scheduler.scale_model_input(noise * np.float32(scheduler.init_noise_sigma), t)
        samples.append(
            {
                "sample": np.concatenate([x, x]).astype(np.float32),
                "timestep": np.asarray(t, np.float32).reshape(()),
                "encoder_hidden_states": states.astype(np.float32),
            }
        )
    return samples


def static_int8(source: Path, work: Path, name: str, op_types: tuple[str, ...], samples, progress=print) -> Path:
    """QDQ int8 with activation ranges calibrated (MinMax) on ``samples()``: ONNX Runtime turns the QDQ pairs
    into QLinearConv / QLinearMatMul kernels (U8S8, which VNNI and AMX-INT8 execute)."""
    out = _target(work, name, "unet")
    if out.is_file():
        return out
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self, feeds):
            self.feeds = iter(feeds)

        def get_next(self):
            return next(self.feeds, None)

    feeds = samples()
    progress(f"  quantizing {source} statically to int8 QDQ ({', '.join(op_types)}), {len(feeds)} calibration inputs")
    out.parent.mkdir(parents=True, exist_ok=True)
    quantize_static(
        str(source),
        str(out),
        Reader(feeds),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(op_types),
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=True,
        extra_options={"DefaultTensorType": 1},
    )
    return out
