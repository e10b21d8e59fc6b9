"""A streamed transformer's attention as ONNX Runtime's CPU flash attention (``com.microsoft.MultiHeadAttention``).

The dynamo exporter at opset 23 writes ``F.scaled_dot_product_attention`` as the standard ``Attention`` op on
(batch, heads, tokens, head size) tensors. ONNX Runtime's CPU kernel for it materialises the score matrix
(24 heads x 4608² tokens: 2.0 GB for one FLUX attention at 1024x1024); its ``MultiHeadAttention`` never does.
Measured alone on this machine, one such attention: ``Attention`` 1.18 s and a 2.19 GB peak, MatMul/Softmax
(opset 18) 1.42 s and 4.17 GB, ``MultiHeadAttention`` 0.92 s and 0.29 GB. Each unmasked, non-causal
``Attention`` with static heads and head size becomes Transpose/Reshape to (batch, tokens, heads x head size),
``MultiHeadAttention``, and back. Masked ones (CLIP's causal mask) stay as they are.
"""

from __future__ import annotations

import numpy as np

from .weights import replace_node

OPSET = 23  # the first with the standard Attention op


def _static(value, axis: int) -> int | None:
    shape = value.shape
    if shape is None or len(shape) != 4:
        return None
    dim = shape[axis]
    return dim if isinstance(dim, int) else None


def fuse(model) -> int:
    """Rewrite ``model`` (onnx_ir) in place; the number of attentions rewritten."""
    import onnx_ir as ir

    graph = model.graph
    to_tokens = ir.Value(name="mha.to_tokens", const_value=ir.tensor(np.array([0, 0, -1], dtype=np.int64)))
    graph.register_initializer(to_tokens)
    count = 0
    for node in list(graph):
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
            continue
        inputs = [v for v in node.inputs]
        if (
            len(inputs) > 3
            and any(v is not None for v in inputs[3:])
            or len(node.outputs) > 1
            and any(out.uses() for out in node.outputs[1:])
        ):
            continue  # a mask, a KV cache or extra outputs
        attrs = node.attributes
        if attrs.get("is_causal") is not None and attrs["is_causal"].value:
            continue
        if attrs.get("softcap") is not None and attrs["softcap"].value:
            continue
        q, k, v = inputs[:3]
        heads, size = _static(q, 1), _static(q, 3)
        if heads is None or size is None or _static(k, 1) != heads or _static(v, 1) != heads:
            continue
        scale = attrs["scale"].value if attrs.get("scale") is not None else None
        flat = []
        for value in (q, k, v):
            moved = ir.node("Transpose", [value], attributes={"perm": [0, 2, 1, 3]})
            shaped = ir.node("Reshape", [moved.outputs[0], to_tokens])
            graph.insert_before(node, [moved, shaped])
            flat.append(shaped.outputs[0])
        mha_attrs = {"num_heads": heads} if scale is None else {"num_heads": heads, "scale": float(scale)}
        mha = ir.node("MultiHeadAttention", flat, attributes=mha_attrs, domain="com.microsoft")
        split = ir.Value(name=f"{node.name}.heads", const_value=ir.tensor(np.array([0, 0, heads, size], np.int64)))
        graph.register_initializer(split)
        back = ir.node("Reshape", [mha.outputs[0], split])
        out = ir.node("Transpose", [back.outputs[0]], attributes={"perm": [0, 2, 1, 3]})
        graph.insert_before(node, [mha, back])
        replace_node(graph, node, out)
        count += 1
    if count:
        model.opset_imports.setdefault("com.microsoft", 1)
    else:
        del graph.initializers[to_tokens.name]
    return count
