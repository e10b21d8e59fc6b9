"""Multiply-add FLOPs of an ONNX graph at concrete input shapes, counted from the graph itself.

Shapes come from onnx shape inference (with data propagation, so the exporters' Shape→Gather→Concat→Reshape
chains resolve) at the given input shapes; where that leaves a shape unknown, ONNX Runtime's symbolic shape
inference is tried. Counted: MatMul-like ops 2·M·N·K per batch element, Conv-like ops
2·N·Cout·(Cin/groups)·kh·kw·Hout·Wout, fused attention 4·B·S·L·hidden. Elementwise ops, norms and softmax
are left out: they are memory-bound and a few percent of the work.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MATMUL_OPS = {
    "MatMul",
    "FusedMatMul",
    "MatMulInteger",
    "QLinearMatMul",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
}
GEMM_OPS = {"Gemm", "FusedGemm", "QGemm"}
CONV_OPS = {"Conv", "FusedConv", "ConvInteger", "QLinearConv", "NhwcConv", "NhwcFusedConv"}
ATTENTION_OPS = {"MultiHeadAttention", "Attention"}


@dataclass
class FlopCount:
    total: int = 0
    by_op: Counter = field(default_factory=Counter)
    unresolved: list[str] = field(default_factory=list)  # nodes whose shapes stayed unknown (not counted)

    def add(self, op: str, flops: int) -> None:
        self.total += int(flops)
        self.by_op[op] += int(flops)


def _dims(value_info) -> list[int] | None:
    tensor = value_info.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    dims = []
    for d in tensor.shape.dim:
        if not d.HasField("dim_value"):
            return None
        dims.append(d.dim_value)
    return dims


def _with_input_shapes(model, input_shapes: dict[str, tuple[int, ...]]):
    """A copy of the graph whose inputs have the concrete shapes (weights left out: shapes are all we need)."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    for inp in model.graph.input:
        if inp.name in input_shapes:
            dims = inp.type.tensor_type.shape.dim
            shape = input_shapes[inp.name]
            if len(dims) != len(shape):
                raise ValueError(f"input {inp.name} has rank {len(dims)}, got shape {shape}")
            for d, v in zip(dims, shape, strict=True):
                d.Clear()
                d.dim_value = int(v)
    del model.graph.value_info[:]
    return model


def _shape_table(model) -> dict[str, list[int] | None]:
    table = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        table[vi.name] = _dims(vi)
    for init in model.graph.initializer:
        table[init.name] = list(init.dims)
    return table


# ops of the exporters' shape arithmetic (chunk sizes, head splits) that are folded to constants when all their
# inputs are known small tensors: what onnx's data propagation leaves open (e.g. FLUX's AdaLayerNorm chunks)
_FOLDABLE = {
    "Gather", "Unsqueeze", "Squeeze", "Concat", "Mul", "Add", "Sub", "Div", "Slice", "Cast", "Equal", "Where",
    "Range", "Reshape", "Floor", "Ceil", "Max", "Min", "Neg", "Abs", "ReduceProd", "Identity", "Mod",
}  # fmt: skip
_SMALL = 64  # elements: shape vectors and scalars only, never activations


def _all_resolved(model, table) -> bool:
    return all(table.get(o) for n in model.graph.node if n.op_type in MATMUL_OPS | CONV_OPS for o in n.output)


def _constant(node):
    """A Constant node's value: ``value`` (a tensor) or, as the dynamo exporter writes small ones, ``value_int(s)`` /
    ``value_float(s)``; None for a sparse or string constant."""
    from onnx import helper, numpy_helper

    attr = node.attribute[0]
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    if attr.name in ("value_int", "value_ints"):
        return np.array(helper.get_attribute_value(attr), dtype=np.int64)
    if attr.name in ("value_float", "value_floats"):
        return np.array(helper.get_attribute_value(attr), dtype=np.float32)
    return None


def _contrib_shapes(model, table) -> int:
    """Output shapes onnx's inference does not know for com.microsoft ops: MultiHeadAttention's output has its
    query's shape (batch, tokens, hidden), as the streamed transformers use it. Written as value_info (kept
    through the next inference); returns how many are new."""
    from onnx import TensorProto, helper

    added = 0
    for node in model.graph.node:
        if node.op_type != "MultiHeadAttention" or not table.get(node.input[0]):
            continue
        if not table.get(node.output[0]):
            table[node.output[0]] = list(table[node.input[0]])
            added += 1
        model.graph.value_info.append(
            helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, table[node.output[0]])
        )
    return added


def _fold_shape_arithmetic(model, table) -> int:
    """Replace, in place, ``Shape`` of tensors whose shape is known and small integer arithmetic on constants
    by initializers (evaluated with onnx's reference evaluator). Returns how many nodes were folded."""
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if np.prod(t.dims) <= _SMALL}
    keep, folded = [], 0
    for node in model.graph.node:
        out = None
        if node.op_type == "Constant":
            values[node.output[0]] = _constant(node)
        elif node.op_type == "Shape" and table.get(node.input[0]) is not None:
            dims = np.array(table[node.input[0]], dtype=np.int64)
            start, end = _attr(node, "start", 0), _attr(node, "end", None)
            out = [dims[start:end]]
        elif node.op_type in _FOLDABLE and all(not i or values.get(i) is not None for i in node.input):
            inputs = [values[i] for i in node.input if i]
            if all(np.size(v) <= _SMALL for v in inputs):
                sub = helper.make_graph(
                    [node], "fold",
                    [helper.make_tensor_value_info(i, numpy_helper.from_array(values[i]).data_type, None)
                     for i in dict.fromkeys(i for i in node.input if i)],
                    [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output],
                )  # fmt: skip
                try:
                    sub_model = helper.make_model(sub, opset_imports=model.opset_import)
                    out = ReferenceEvaluator(sub_model).run(None, {i: values[i] for i in node.input if i})
                except Exception:  # noqa: BLE001 - left to shape inference as it is
                    out = None
        if out is not None and all(np.size(v) <= _SMALL for v in out):
            for name, value in zip(node.output, out, strict=False):
                values[name] = np.asarray(value)
                model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
            folded += 1
            continue
        keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return folded


def infer_shapes(model, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, list[int] | None]:
    import onnx

    concrete = _with_input_shapes(model, input_shapes)
    inferred = onnx.shape_inference.infer_shapes(concrete, data_prop=True)
    table = _shape_table(inferred)
    for _ in range(6):  # fold what is now known, infer again, while that resolves more
        if _all_resolved(inferred, table):
            return table
        folded = _fold_shape_arithmetic(concrete, table)
        del concrete.graph.value_info[:]
        if not folded + _contrib_shapes(concrete, table):
            break
        inferred = onnx.shape_inference.infer_shapes(concrete, data_prop=True)
        table = {**table, **{k: v for k, v in _shape_table(inferred).items() if v}}
    if _all_resolved(inferred, table):
        return table
    try:  # ONNX Runtime's symbolic inference folds more of the shape arithmetic
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        symbolic = SymbolicShapeInference.infer_shapes(concrete, auto_merge=True, guess_output_rank=True)
        if symbolic is not None:
            for name, dims in _shape_table(symbolic).items():
                if dims and not table.get(name):
                    table[name] = dims
    except Exception:  # noqa: BLE001 - a best effort; unresolved nodes are reported, not guessed
        pass
    return table


def load_structure(path: Path, small: int = 4096) -> tuple[object, set[str]]:
    """The graph without its weights: small initializers (shape constants, which shape inference folds) are
    read, large ones become graph inputs of the same shape and type (their names are returned). A 3.4 GB
    UNet loads in a second."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    keep, moved = [], set()
    for tensor in model.graph.initializer:
        if int(np.prod(tensor.dims, dtype=np.int64)) > small:
            moved.add(tensor.name)
            model.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
            continue
        if uses_external_data(tensor):
            load_external_data_for_tensor(tensor, str(path.parent))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
        keep.append(tensor)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return model, moved


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            import onnx

            return onnx.helper.get_attribute_value(a)
    return default


def _matmul(a: list[int], b: list[int], out: list[int]) -> int:
    # (..., M, K) x (..., K, N) -> (..., M, N): every output element is a K-long dot product
    k = a[-1] if len(a) >= 1 else 1
    return 2 * int(np.prod(out, dtype=np.int64)) * k


def _gemm(node, a: list[int], out: list[int]) -> int:
    k = a[0] if _attr(node, "transA", 0) else a[1]
    return 2 * int(np.prod(out, dtype=np.int64)) * k


def _conv(node, w: list[int], out: list[int]) -> int:
    # weight (Cout, Cin/groups, kh, kw): each output element is a Cin/groups·kh·kw dot product
    per_output = int(np.prod(w[1:], dtype=np.int64))
    return 2 * int(np.prod(out, dtype=np.int64)) * per_output


def _attention(node, shapes) -> int | None:
    q = shapes.get(node.input[0])
    if not q:
        return None
    if node.op_type == "MultiHeadAttention":
        k = shapes.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        if not k or len(q) != 3:
            return None
        b, s, hidden = q
        kv_len = k[1] if len(k) == 3 else k[2]
        return 4 * b * s * kv_len * hidden  # Q·Kᵀ and P·V
    return None


def count(model_or_path, input_shapes: dict[str, tuple[int, ...]]) -> FlopCount:
    """FLOPs of one run of the graph with inputs of ``input_shapes`` (name → shape)."""

    model, moved = model_or_path, set()
    if isinstance(model_or_path, (str, Path)):
        model, moved = load_structure(Path(model_or_path))
    shapes = infer_shapes(model, input_shapes)
    weights = moved | {t.name for t in model.graph.initializer}
    result = FlopCount()
    for node in model.graph.node:
        op = node.op_type
        out = shapes.get(node.output[0]) if node.output else None
        if op in MATMUL_OPS | GEMM_OPS | CONV_OPS | ATTENTION_OPS and not out:
            if op not in ATTENTION_OPS:
                result.unresolved.append(node.name or op)
                continue
        if op in MATMUL_OPS:
            a = shapes.get(node.input[0])
            if not a:
                result.unresolved.append(node.name or op)
                continue
            # activation × activation products are attention's scores and weighted values
            kind = op if node.input[1] in weights else f"{op} (attention)"
            result.add(kind, _matmul(a, shapes.get(node.input[1]) or [], out))
        elif op in GEMM_OPS:
            a = shapes.get(node.input[0])
            if not a:
                result.unresolved.append(node.name or op)
                continue
            result.add(op, _gemm(node, a, out))
        elif op in CONV_OPS:
            w_index = 3 if op == "QLinearConv" else 1
            w = shapes.get(node.input[w_index])
            if not w:
                result.unresolved.append(node.name or op)
                continue
            result.add(op, _conv(node, w, out))
        elif op in ATTENTION_OPS:
            flops = _attention(node, shapes)
            if flops is None:
                result.unresolved.append(node.name or op)
            else:
                result.add(op, flops)
    return result
