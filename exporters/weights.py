"""Weight formats of a streamed graph (``--weights``, ``--text-encoder-weights``): what each initializer becomes.

- ``fp32``: every weight as stored, in float32; a Linear's weight is written pre-transposed for its MatMul
  (the dynamo exporter traces ``x @ W.T`` as a Transpose feeding the MatMul), so no transpose runs or is
  constant-folded at load time.
- ``int8`` / ``int4``: each Linear weight (N outputs × K inputs) quantized block-wise along K, symmetric
  (one float32 scale per block of ``BLOCK``, no zero point: stored value + 2^(bits-1) as ONNX Runtime's
  ``MatMulNBits`` reads it), the MatMul or Gemm replaced by ``MatMulNBits`` with accuracy level 4 (activations
  quantized to int8 per block, int8 dot products). Token embedding tables (a Gather's table) are stored as
  bf16 and cast to float32 after the lookup: exact for the bf16 checkpoints the hub ships, half the bytes
  (Qwen2.5-VL's 152064 x 3584 table: 2.2 → 1.1 GB). Everything else (norms, biases, convolutions of the
  patch embedding) stays fp32. The scale of each block is its largest-magnitude value over −2^(bits-1),
  as llama.cpp's ``q4_0``/``q8_0`` do, so the whole code range is used.
- ``int8`` also stores each convolution's weight (the UNets') in int8, symmetric per output channel, read by a
  ``DequantizeLinear`` feeding the ``Conv``: ONNX Runtime 1.32 keeps that node at load (it does not fold it
  back to fp32), so the weights stay 1 byte in memory and are widened one convolution at a time as it runs.
  Convolutions with at most ``EDGE_CHANNELS`` input or output channels (the latent side: conv_in, conv_out, a
  patch embedding) stay fp32: their error goes straight into the sample, and they cost next to nothing.

On this machine's 2 cores a 1024×3072 · 3072×12288 MatMul took 507 ms fp32, 209 ms int4 and 200 ms int8 with
blocks of 128 (295 and 308 ms with blocks of 64, which cost accuracy nothing measurable): hence 128.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FORMATS = ("fp32", "int8", "int4")
BITS = {"int8": 8, "int4": 4}
BLOCK = 128
ACCURACY_LEVEL = 4
EDGE_CHANNELS = 16  # latent (4 or 16) and RGB (3) channel counts: such convolutions stay fp32
PREFIX = "module."  # the traced wrapper holds the component as ``module``
# Validation floors: the output's signal-to-noise ratio against PyTorch fp32 on the validation inputs, below
# which a quantized graph is broken (wrong scales, a mis-packed block), not merely less precise. Measured
# (docs/benchmarks.md, "Weight formats"): tiny and full-width reduced-depth random models give int8 30-45 dB,
# int4 18-25 dB; the floors leave room for real checkpoints' outlier weights.
MIN_SNR_DB = {
    "denoiser": {"int8": 20.0, "int4": 10.0},
    "text_encoder": {"int8": 20.0, "int4": 10.0},
}


def describe(fmt: str, int8_convs: int = 0) -> str:
    if fmt == "fp32":
        return "fp32"
    convs = "; convolutions int8 per output channel (DequantizeLinear)" if int8_convs else ""
    return (
        f"MatMulNBits {BITS[fmt]}-bit weights, block {BLOCK}, symmetric; accuracy level {ACCURACY_LEVEL} "
        f"(int8 activations){convs}; token embeddings bf16; other weights fp32"
    )


def quantize(weight: np.ndarray, bits: int, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) float weight → MatMulNBits' B (N, K/block, block·bits/8) uint8 and scales (N·K/block,) float32.
    K is zero-padded to a whole number of blocks."""
    n, k = weight.shape
    blocks = -(-k // block)
    if blocks * block != k:
        weight = np.pad(weight, ((0, 0), (0, blocks * block - k)))
    grouped = weight.reshape(n, blocks, block).astype(np.float32, copy=False)
    at = np.abs(grouped).argmax(axis=-1)
    extreme = np.take_along_axis(grouped, at[..., None], axis=-1)[..., 0]
    half = 1 << (bits - 1)
    scale = extreme / -half
    scale[scale == 0] = 1.0
    q = np.rint(grouped / scale[..., None])
    q += half
    np.clip(q, 0, 2 * half - 1, out=q)
    q = q.astype(np.uint8)
    if bits == 4:  # two values a byte, the first in the low nibble
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q, scale.astype(np.float32).reshape(-1)


def quantize_channels(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A convolution's (out, in, *kernel) float weight → int8 values and one float32 scale per output channel
    (symmetric, zero point 0: ``DequantizeLinear(q, scale, axis=0)`` gives the weight back)."""
    flat = weight.reshape(weight.shape[0], -1).astype(np.float32, copy=False)
    scale = np.abs(flat).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(flat / scale[:, None]), -127, 127).astype(np.int8)
    return q.reshape(weight.shape), scale.astype(np.float32)


def dequantize(q: np.ndarray, scale: np.ndarray, bits: int, k: int) -> np.ndarray:
    """The weight MatMulNBits computes with (for tests and error reports)."""
    n, blocks, _ = q.shape
    if bits == 4:
        q = np.stack([q & 0x0F, q >> 4], axis=-1).reshape(n, blocks, -1)
    values = (q.astype(np.float32) - (1 << (bits - 1))) * scale.reshape(n, blocks, 1)
    return values.reshape(n, -1)[:, :k]


@dataclass
class Job:
    """One checkpoint tensor → the initializer value(s) it becomes."""

    source: str  # state-dict name
    targets: list  # onnx_ir Values, filled in order from ``arrays``
    transform: str  # "as-is", "transpose" or "int4"/"int8"

    def arrays(self, source: np.ndarray):
        if self.transform == "as-is":
            yield self.targets[0], source
        elif self.transform == "bf16":
            yield self.targets[0], bf16_bits(source)
        elif self.transform == "transpose":
            yield self.targets[0], source.T
        elif self.transform == "conv-int8":
            q, scales = quantize_channels(source)
            yield self.targets[0], q
            yield self.targets[1], scales
        else:
            q, scales = quantize(source, BITS[self.transform])
            yield self.targets[0], q
            yield self.targets[1], scales


def bf16_bits(values: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
    """float32 → bf16 (round to nearest even) as uint16 bits: exact for values that came from bf16. Converted
    ``chunk`` values at a time: whole-table temporaries of a 545 M-value table would be 2.2 GB each."""
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1).view(np.uint32)
    out = np.empty(flat.size, dtype=np.uint16)
    for start in range(0, flat.size, chunk):
        bits = flat[start : start + chunk]
        out[start : start + chunk] = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return out.reshape(np.shape(values))


@dataclass
class Plan:
    jobs: list[Job] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)  # format → Linear weights in it
    int8_convs: int = 0  # convolution weights stored int8 (int8 only)
    embeddings: int = 0  # token embedding tables stored as bf16
    embedding_bytes: int = 0  # their bytes in the data file


def _is_meta(value) -> bool:
    raw = getattr(value.const_value, "raw", None)
    return value.const_value is None or getattr(raw, "is_meta", False)


def plan(model, fmt: str) -> Plan:
    """Rewrite the traced graph for ``fmt`` (MatMul/Gemm → MatMulNBits, Transpose(W) → W pre-transposed) and
    list the tensors to write. Initializers the exporter made from values (not the module's weights) stay."""
    import onnx_ir as ir

    if fmt not in FORMATS:
        raise ValueError(f"weights {fmt!r}: use one of {', '.join(FORMATS)}")
    graph = model.graph
    result = Plan()
    claimed: set[str] = set()
    for node in list(graph):
        weight = _linear_weight(node)
        if weight is None:
            continue
        name, transposed_by = weight
        if name in claimed:  # one weight, two Linears (tied): the first rewrite serves both
            continue
        source = graph.initializers[name]
        n, k = (int(d) for d in source.shape)
        if fmt == "fp32":
            if transposed_by is None:
                continue  # a Gemm with transB: as fast as it is
            target = ir.Value(name=f"{name}.T", shape=ir.Shape([k, n]), type=ir.TensorType(ir.DataType.FLOAT))
            node.replace_input_with(1, target)
            result.jobs.append(Job(name.removeprefix(PREFIX), [target], "transpose"))
        else:
            bits = BITS[fmt]
            q = ir.Value(name=f"{name}.q{bits}", type=ir.TensorType(ir.DataType.UINT8))
            scales = ir.Value(name=f"{name}.scales", type=ir.TensorType(ir.DataType.FLOAT))
            bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
            inputs = [node.inputs[0], q, scales] + ([None, None, bias] if bias is not None else [])
            attrs = {"K": k, "N": n, "bits": bits, "block_size": BLOCK, "accuracy_level": ACCURACY_LEVEL}
            replacement = ir.node(
                "MatMulNBits", inputs, attributes=attrs, domain="com.microsoft", name=f"{node.name}_nbits"
            )
            replace_node(graph, node, replacement)
            result.jobs.append(Job(name.removeprefix(PREFIX), [q, scales], fmt))
        result.formats[fmt] = result.formats.get(fmt, 0) + 1
        claimed.add(name)
        if transposed_by is not None and not transposed_by.outputs[0].uses():
            graph.remove(transposed_by, safe=True)
    if fmt != "fp32":
        model.opset_imports.setdefault("com.microsoft", 1)
        claimed |= _bf16_embeddings(graph, result)
    if fmt == "int8":
        claimed |= _int8_convs(graph, result)
    for name in list(graph.initializers):
        value = graph.initializers[name]
        if name in claimed:  # rewritten above: its job is listed, or it is gone
            if not value.uses():
                del graph.initializers[name]
        elif _is_meta(value):
            result.jobs.append(Job(name.removeprefix(PREFIX), [value], "as-is"))
    return result


def _bf16_embeddings(graph, result: Plan) -> set[str]:
    """Store every module table read only by Gathers (token embeddings) as bf16, a Cast after each lookup."""
    import onnx_ir as ir

    tables: dict[str, list] = {}
    for node in graph:
        table = node.inputs[0] if node.op_type == "Gather" and node.inputs else None
        if table is not None and table.is_initializer() and _is_meta(table) and len(table.shape or ()) == 2:
            tables.setdefault(table.name, []).append(node)
    done = set()
    for name, gathers in tables.items():
        table = graph.initializers[name]
        if any(use.node not in gathers or use.idx != 0 for use in table.uses()):
            continue  # also read another way (a tied output projection): left as it is
        table.type = ir.TensorType(ir.DataType.BFLOAT16)
        for gather in gathers:
            out = gather.outputs[0]
            cast = ir.node("Cast", [out], attributes={"to": ir.DataType.FLOAT}, name=f"{gather.name}_to_float")
            graph.insert_after(gather, cast)
            widened = cast.outputs[0]
            widened.name, out.name = out.name, f"{out.name}.bf16"
            widened.shape, widened.type = out.shape, ir.TensorType(ir.DataType.FLOAT)
            out.type = ir.TensorType(ir.DataType.BFLOAT16)
            if out.is_graph_output():
                graph.outputs[graph.outputs.index(out)] = widened
            for use in list(out.uses()):
                if use.node is not cast:
                    use.node.replace_input_with(use.idx, widened)
        result.jobs.append(Job(name.removeprefix(PREFIX), [table], "bf16"))
        result.embeddings += 1
        result.embedding_bytes += 2 * int(np.prod([int(d) for d in table.shape]))
        done.add(name)
    return done


def _int8_convs(graph, result: Plan) -> set[str]:
    """Each Conv's module weight (more than EDGE_CHANNELS channels in and out) stored int8 per output channel,
    read through a DequantizeLinear."""
    import onnx_ir as ir

    done = set()
    gates: dict = {}  # a Conv's input → its gate
    for node in list(graph):
        weight = node.inputs[1] if node.op_type == "Conv" and len(node.inputs) > 1 else None
        if weight is None or not weight.is_initializer() or not _is_meta(weight) or weight.name in done:
            continue
        dims = [int(d) for d in weight.shape]
        if len(dims) < 3 or min(dims[0], dims[1]) <= EDGE_CHANNELS or len(weight.uses()) != 1:
            continue
        q = ir.Value(name=f"{weight.name}.q8", shape=ir.Shape(dims), type=ir.TensorType(ir.DataType.INT8))
        scales = ir.Value(name=f"{weight.name}.scales", shape=ir.Shape(dims[:1]), type=ir.TensorType(ir.DataType.FLOAT))
        gated = ir.node("Mul", [scales, _gate(graph, node, gates)], name=f"{node.name}_weight_scales")
        dequantize = ir.node(
            "DequantizeLinear", [q, gated.outputs[0]], attributes={"axis": 0}, name=f"{node.name}_weight"
        )
        graph.insert_before(node, [gated, dequantize])
        widened = dequantize.outputs[0]
        widened.name, widened.shape, widened.type = f"{weight.name}.dq", weight.shape, ir.TensorType(ir.DataType.FLOAT)
        node.replace_input_with(1, widened)
        result.jobs.append(Job(weight.name.removeprefix(PREFIX), [q, scales], "conv-int8"))
        result.int8_convs += 1
        done.add(weight.name)
    return done


def _gate(graph, conv, gates: dict):
    """1.0 (shape (1,)) computed from the Conv's input: multiplying the scales by it makes the DequantizeLinear
    wait for that input. Without it the node reads only initializers, and ONNX Runtime's execution order may
    run it long before its Conv (on IF-I-XL's UNet 32 widened weights were alive at once: 9.0 GB for 4.1 GB
    of int8); the batch size is dynamic, so no optimiser folds it."""
    import onnx_ir as ir

    x = conv.inputs[0]
    if x not in gates:
        shape = ir.node("Shape", [x], attributes={"start": 0, "end": 1}, name=f"{conv.name}_gate_batch")
        cast = ir.node("Cast", shape.outputs, attributes={"to": ir.DataType.FLOAT}, name=f"{conv.name}_gate_cast")
        one = ir.node("Sign", cast.outputs, name=f"{conv.name}_gate")
        graph.insert_before(conv, [shape, cast, one])
        gates[x] = one.outputs[0]
    return gates[x]


def _linear_weight(node):
    """(initializer name, the Transpose node or None) when ``node`` is a Linear: MatMul(x, Transpose(W)) or
    Gemm(x, W, b, transB=1) with W a 2-D weight initializer of the module."""
    if node.op_type == "MatMul":
        producer = node.inputs[1].producer()
        if producer is None or producer.op_type != "Transpose":
            return None
        perm = producer.attributes.get("perm")
        weight = producer.inputs[0]
        if perm is None or list(perm.value) != [1, 0] or not weight.is_initializer() or not _is_meta(weight):
            return None
        if any(use.node.op_type != "MatMul" for use in producer.outputs[0].uses()):
            return None
        return weight.name, producer
    if node.op_type == "Gemm":
        attrs = node.attributes

        def attr(key, default):
            return attrs[key].value if attrs.get(key) is not None else default

        if attr("transA", 0) != 0 or attr("transB", 0) != 1 or attr("alpha", 1.0) != 1.0 or attr("beta", 1.0) != 1.0:
            return None
        weight = node.inputs[1]
        if not weight.is_initializer() or not _is_meta(weight) or len(weight.shape) != 2:
            return None
        return weight.name, None
    return None


def replace_node(graph, old, new) -> None:
    """``new`` (one output) in ``old``'s place: inserted before it, taking its output's name, shape and uses."""
    graph.insert_before(old, new)
    out, replacement = old.outputs[0], new.outputs[0]
    replacement.name, out.name = out.name, f"{out.name}.replaced"
    replacement.shape, replacement.type = out.shape, out.type
    if out.is_graph_output():
        graph.outputs[graph.outputs.index(out)] = replacement
    out.replace_all_uses_with(replacement)
    graph.remove(old, safe=True)
