"""An ONNX file's interface — graph inputs and outputs with dtypes and shapes, opset, producer, external
weight files — read from the protobuf with the standard library, without loading the weights.

The registry imports no runtime (no ``onnx``, no onnxruntime); this reader walks ``ModelProto`` field by
field and seeks over everything it does not need (nodes, inline initializers), so a multi-GB graph costs a
few thousand small reads. Field numbers are onnx.proto's (IR version 3 and later).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

# TensorProto.DataType → the type strings onnxruntime's get_inputs() reports
ELEM_TYPES = {
    1: "tensor(float)",
    2: "tensor(uint8)",
    3: "tensor(int8)",
    5: "tensor(int16)",
    6: "tensor(int32)",
    7: "tensor(int64)",
    9: "tensor(bool)",
    10: "tensor(float16)",
    11: "tensor(double)",
    16: "tensor(bfloat16)",
}
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_SMALL = 1 << 16  # an initializer smaller than this is read to find its external-data location


class OnnxFormatError(ValueError):
    """The file is not a readable ONNX model."""


@dataclass
class Value:
    name: str
    type: str  # e.g. "tensor(float)"
    shape: list  # ints for fixed dims, strings for named ones, None for unknown; [] for a scalar

    def as_dict(self) -> dict:
        return {"dtype": self.type, "shape": self.shape}


@dataclass
class GraphInterface:
    inputs: list[Value] = field(default_factory=list)
    outputs: list[Value] = field(default_factory=list)
    opset: int | None = None
    producer: str = ""
    external_data: set[str] = field(default_factory=set)  # files the weights live in, relative to the graph

    def input(self, name: str) -> Value | None:
        return next((v for v in self.inputs if v.name == name), None)

    @property
    def input_names(self) -> list[str]:
        return [v.name for v in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [v.name for v in self.outputs]


def _varint(f) -> int:
    result = shift = 0
    while True:
        byte = f.read(1)
        if not byte:
            raise EOFError
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
        shift += 7


def _fields(f, span):
    """(field number, wire type, value) of the message at ``span`` = (start, length); a LEN value is its own
    (start, length), not read."""
    f.seek(span[0])
    end = span[0] + span[1]
    while f.tell() < end:
        key = _varint(f)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            yield number, wire, _varint(f)
        elif wire == _LEN:
            length = _varint(f)
            start = f.tell()
            yield number, wire, (start, length)
            f.seek(start + length)
        elif wire == _I64:
            f.seek(8, io.SEEK_CUR)
        elif wire == _I32:
            f.seek(4, io.SEEK_CUR)
        else:
            raise OnnxFormatError(f"wire type {wire}")


def _text(f, span) -> str:
    f.seek(span[0])
    return f.read(span[1]).decode("utf-8", "replace")


def _value_info(f, span) -> Value:
    name, elem, shape = "", None, None
    for number, wire, value in _fields(f, span):
        if number == 1 and wire == _LEN:
            name = _text(f, value)
        elif number == 2 and wire == _LEN:  # TypeProto
            for n, w, v in _fields(f, value):
                if n == 1 and w == _LEN:  # TypeProto.Tensor
                    elem, shape = _tensor_type(f, v)
    return Value(name, ELEM_TYPES.get(elem, f"tensor({elem})" if elem is not None else "unknown"), shape)


def _tensor_type(f, span):
    elem, shape = None, None
    for number, wire, value in _fields(f, span):
        if number == 1 and wire == _VARINT:
            elem = value
        elif number == 2 and wire == _LEN:  # TensorShapeProto: repeated Dimension
            shape = []
            for n, w, dim in _fields(f, value):
                if n == 1 and w == _LEN:
                    size = None
                    for dn, dw, dv in _fields(f, dim):
                        if dn == 1 and dw == _VARINT:
                            size = dv
                        elif dn == 2 and dw == _LEN:
                            size = _text(f, dv)
                    shape.append(size)
    return elem, shape


def _external_location(f, span) -> str | None:
    """TensorProto.external_data's "location", when data_location is EXTERNAL (1)."""
    location, external = None, False
    for number, wire, value in _fields(f, span):
        if number == 13 and wire == _LEN:  # StringStringEntryProto
            key = text = None
            for n, w, v in _fields(f, value):
                if n == 1 and w == _LEN:
                    key = _text(f, v)
                elif n == 2 and w == _LEN:
                    text = _text(f, v)
            if key == "location":
                location = text
        elif number == 14 and wire == _VARINT:
            external = value == 1
    return location if external else None


def read_interface(path: str | Path) -> GraphInterface:
    """The graph's interface; OnnxFormatError when the file is not an ONNX model."""
    found = GraphInterface()
    with open(path, "rb", buffering=1 << 16) as f:
        size = Path(path).stat().st_size
        graph, producer = None, {}
        try:
            for number, wire, value in _fields(f, (0, size)):
                if number == 7 and wire == _LEN:
                    graph = value
                elif number in (2, 3) and wire == _LEN:  # producer_name, producer_version
                    producer[number] = _text(f, value)
                elif number == 8 and wire == _LEN:  # OperatorSetIdProto: the default domain's version
                    domain, version = "", None
                    for n, w, v in _fields(f, value):
                        if n == 1 and w == _LEN:
                            domain = _text(f, v)
                        elif n == 2 and w == _VARINT:
                            version = v
                    if domain in ("", "ai.onnx"):
                        found.opset = version
            if graph is None:
                raise OnnxFormatError("no graph")
            for number, wire, value in _fields(f, graph):
                if number == 11 and wire == _LEN:
                    found.inputs.append(_value_info(f, value))
                elif number == 12 and wire == _LEN:
                    found.outputs.append(_value_info(f, value))
                elif number == 5 and wire == _LEN and value[1] < _SMALL:
                    location = _external_location(f, value)
                    if location:
                        found.external_data.add(location)
        except (EOFError, OSError, UnicodeError, OnnxFormatError) as exc:
            raise OnnxFormatError(f"{path} is not a readable ONNX model ({exc or type(exc).__name__})") from None
    found.producer = " ".join(producer[n] for n in sorted(producer) if producer[n])
    if not found.outputs:
        raise OnnxFormatError(f"{path} is not a readable ONNX model (its graph has no outputs)")
    return found
