"""The UNet rewritten for ONNX Runtime's CPU execution provider: attention as flash attention.

A plain export computes attention as MatMul → Softmax → MatMul over a (B, heads, HW, HW) score tensor:
1 GB per tensor for SD 1.5 at 512×512, a third of the step (docs/benchmarks.md). onnxruntime's own
transformer optimizer fuses the UNet's attention, LayerNorm and GELU; its self-attention ``Attention``
node (packed QKV weight) has no flash kernel on CPU, so it is split into three MatMuls feeding
``MultiHeadAttention``, whose CPU kernel never materialises the scores. Measured on the full-size SD 1.5:
step 0.94×, peak memory −4 GB, 90.7 dB against the plain graph. Names, inputs and outputs are unchanged.
"""

from __future__ import annotations

import gc
import os
import sys
from collections import Counter
from pathlib import Path

# onnxruntime.transformers' UNet fusions whose contrib ops only have CUDA kernels.
CUDA_ONLY_FUSIONS = (
    "enable_group_norm",
    "enable_skip_group_norm",
    "enable_nhwc_conv",
    "enable_bias_splitgelu",
    "enable_bias_add",
    "enable_packed_qkv",
    "enable_packed_kv",
)
TWO_GB = 2**31


def _patch_num_heads() -> None:
    """onnxruntime 1.32's UNet attention fusion calls int() on a shape-[1] array, which NumPy 2 refuses,
    and then skips every attention; the same lookup with an explicit element."""
    import importlib

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

    # the optimizer imports the module both inside its package and top-level: patch every copy
    for name, module in list(sys.modules.items()):
        if name.endswith("fusion_attention_unet") and hasattr(module, "FusionAttentionUnet"):
            module.FusionAttentionUnet.get_num_heads = get_num_heads


def fuse_attention(model):
    """onnxruntime.transformers' UNet optimizer with the CPU fusions only; returns the ModelProto."""
    import logging

    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    _patch_num_heads()
    options = FusionOptions("unet")
    for name in CUDA_ONLY_FUSIONS:
        setattr(options, name, False)
    options.use_multi_head_attention = True
    logger = logging.getLogger("onnxruntime.transformers")
    level, bars = logger.level, os.environ.get("TQDM_DISABLE")
    logger.setLevel(logging.ERROR)
    os.environ["TQDM_DISABLE"] = "1"  # its per-fusion progress bar; the export prints its own stages
    try:
        optimized = optimize_model(model, model_type="unet", optimization_options=options, opt_level=0)
    finally:
        logger.setLevel(level)
        if bars is None:
            os.environ.pop("TQDM_DISABLE")
        else:
            os.environ["TQDM_DISABLE"] = bars
    return optimized.model


def split_packed_attention(model) -> int:
    """Every com.microsoft ``Attention`` node (packed QKV weight) → three MatMuls + ``MultiHeadAttention``,
    in place. Returns how many were split."""
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    nodes, split = [], 0
    for node in model.graph.node:
        if node.op_type != "Attention" or node.domain != "com.microsoft":
            nodes.append(node)
            continue
        split += 1
        heads = next(a.i for a in node.attribute if a.name == "num_heads")
        weight = numpy_helper.to_array(inits[node.input[1]])  # (C, 3·C): q, k, v columns side by side
        width = weight.shape[1] // 3
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        has_bias = bias is not None and np.any(numpy_helper.to_array(inits[bias]))
        projections = []
        for i, part in enumerate("qkv"):
            w_name = f"{node.name}_{part}_weight"
            part_weight = np.ascontiguousarray(weight[:, i * width : (i + 1) * width])
            model.graph.initializer.append(numpy_helper.from_array(part_weight, w_name))
            projections.append(f"{node.name}_{part}")
            nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [projections[-1]], name=projections[-1]))
        inputs = projections + ([bias] if has_bias else [])
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
    used = {name for n in nodes for name in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return split


def save(model, path: Path, data_name: str) -> None:
    """Save a ModelProto over ``path``, keeping the graph's layout: weights in ``data_name`` beside it when they
    were there before or pass 2 GB (protobuf's limit), else inline."""
    import onnx

    data = path.with_name(data_name)
    external = data.exists() or sum(len(t.raw_data) for t in model.graph.initializer) >= TWO_GB
    if data.exists():
        data.unlink()
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name)
    else:
        onnx.save_model(model, str(path))


def fuse_unet_for_cpu(path: Path, data_name: str) -> dict:
    """Rewrite the UNet graph at ``path`` in place; returns what changed, for the manifest."""
    import onnx

    # Without its external weights: the optimizer's shape inference copies the whole model twice, which
    # with SD 1.5's 3.4 GB of weights in memory peaked at 11 GB. The few weights the fusion reads (q, k, v
    # projections) are read on demand, relative to the working folder, by onnx's numpy_helper.
    model = onnx.load(str(path), load_external_data=False)
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        fused = fuse_attention(model)
        split = split_packed_attention(fused)
        onnx.load_external_data_for_model(fused, str(path.parent))  # the rest, to write them anew
    finally:
        os.chdir(cwd)
    del model
    if not any(o.domain == "com.microsoft" for o in fused.opset_import):
        fused.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))  # the fused contrib ops
    counts = Counter(n.op_type for n in fused.graph.node)
    save(fused, path, data_name)
    # the in-memory model (all the UNet's weights: 13.5 GB for SDXL) sits in a reference cycle: freed only by
    # the collector, and the validation session is created next (full-size SDXL export: 21.7 GB without this)
    del fused
    gc.collect()
    return {
        "name": "cpu-attention",
        "multi_head_attention": counts.get("MultiHeadAttention", 0),
        "split_packed_attention": split,
        "skip_layer_norm": counts.get("SkipLayerNormalization", 0),
        "layer_norm": counts.get("LayerNormalization", 0),
    }
