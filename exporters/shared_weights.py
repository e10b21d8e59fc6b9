"""A step-cache graph whose weights are all in the whole denoiser's data file reads them there: no second copy.

TaylorSeer's record graph is the whole transformer (its data file is the whole graph's, byte for byte) and its
predict graph is the whole minus the attention modules, so written as they are they would hold the transformer's
weights twice more on disk (a FLUX.1 transformer: 48 GB in fp32 each). ONNX Runtime refuses external data
outside a graph's own folder, so the graph's data file becomes a hard link to the whole graph's and its
initializers point at their offsets there: each one matched by name and compared byte for byte first; any
that differs or is missing leaves the graph with its own copy. ONNX Runtime reads only the ranges a graph
names, so the attention weights in the linked file cost the predict graph nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from .backends import DATA_SUFFIX

CHUNK = 1 << 26  # bytes compared at a time


def _external(model) -> dict:
    """Initializer name → (the TensorProto, {location, offset, length}) for the weights kept outside the graph."""
    import onnx

    out = {}
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            out[tensor.name] = (tensor, {e.key: e.value for e in tensor.external_data})
    return out


def _same_bytes(a: Path, a_offset: int, b: Path, b_offset: int, length: int) -> bool:
    with open(a, "rb") as left, open(b, "rb") as right:
        left.seek(a_offset)
        right.seek(b_offset)
        done = 0
        while done < length:
            size = min(CHUNK, length - done)
            if left.read(size) != right.read(size):
                return False
            done += size
    return True


def share(graph: Path, whole: Path) -> int | None:
    """Make ``graph`` read its weights from ``whole``'s data file (hard-linked beside it) when every one of them
    is there under the same name with the same bytes: the bytes of that file it reads, or None when it keeps
    its own file."""
    import onnx

    data, whole_data = graph.with_name(graph.name + DATA_SUFFIX), whole.with_name(whole.name + DATA_SUFFIX)
    if not data.is_file() or not whole_data.is_file():
        return None
    theirs = _external(onnx.load(str(whole), load_external_data=False))
    model = onnx.load(str(graph), load_external_data=False)
    mine = _external(model)
    offsets = {}
    for name, (_, info) in mine.items():
        there = theirs.get(name, (None, {}))[1]
        length = int(info.get("length", -1))
        if info.get("location") != data.name or there.get("location") != whole_data.name:
            return None
        if length < 0 or int(there.get("length", -2)) != length:
            return None
        offset, at = int(info.get("offset", 0)), int(there.get("offset", 0))
        if not _same_bytes(data, offset, whole_data, at, length):
            return None
        offsets[name] = at
    link = graph.with_name(data.name + ".link")
    try:
        os.link(whole_data, link)
    except OSError:  # a file system without hard links: the graph keeps its copy
        return None
    for name, (tensor, _) in mine.items():
        del tensor.external_data[:]
        for key, value in (("location", data.name), ("offset", offsets[name]), ("length", _length(theirs[name][1]))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
    onnx.save_model(model, str(graph))
    os.replace(link, data)
    return sum(_length(theirs[name][1]) for name in offsets)


def _length(info: dict) -> int:
    return int(info["length"])
