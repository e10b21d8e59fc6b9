"""Streaming export: a big component's graph traced without its weights, then the weights written one at a time.

The module is rebuilt on the meta device (parameters without storage) and traced with the dynamo exporter
(``torch.onnx.export(dynamo=True)``), so tracing costs no weight memory whatever the model's size. The graph's
initializers are then written into ``model.onnx_data`` one tensor at a time, read from the checkpoint
(safetensors shards with plain reads, or a module already in memory) and converted on the way: fp32, or each
Linear weight block-quantized into a ``MatMulNBits`` node (``weights.py``); attention is fused on the way
(``attention.py``). The peak is the traced graph plus one tensor, whatever the depth of the model.

Validation cannot hold a 12 B-parameter model in PyTorch either (``reduced.py``): a component over
``FULL_VALIDATION_BYTES`` in fp32 is compared on a reduced-depth build of the same class, its blocks' weights
read from the same checkpoint, exported by this same code; the manifest records what was compared.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import attention
from . import weights as weight_formats
from .backends import DATA_SUFFIX, quiet

# opset 23: scaled_dot_product_attention is traced as the Attention op, which attention.fuse turns into
# ONNX Runtime's flash attention (the exporter's own minimum is 18)
MIN_DYNAMO_OPSET = attention.OPSET
ALIGNMENT = 4096  # tensor offsets in the data file: page-aligned, so onnxruntime can map them
# Components this size or smaller in fp32 are validated whole against PyTorch; bigger ones on a reduced depth.
# STEPWISE_FULL_VALIDATION_BYTES overrides it (0: every component on a reduced depth, as the depth test runs).
FULL_VALIDATION_BYTES = int(os.environ.get("STEPWISE_FULL_VALIDATION_BYTES", 1_500_000_000))
# The component classes exported this way (the VAE, a few hundred MB, is loaded and exported as usual).
STREAMED_CLASSES = (
    "FluxTransformer2DModel",
    "SD3Transformer2DModel",
    "QwenImageTransformer2DModel",
    "UNet2DConditionModel",
    "T5EncoderModel",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "Qwen2_5_VLForConditionalGeneration",  # built on meta from a folder; only its language model is exported
    "Qwen2_5_VLTextModel",  # Qwen-Image's text encoder: its Component's module is the language model alone
    "HiDreamImageTransformer2DModel",
    "LlamaForCausalLM",  # HiDream's text_encoder_4, built on meta from a folder; only its LlamaModel is exported
    "LlamaModel",
)
# Families whose checkpoints are always streamed, tiny ones included.
STREAMED_FAMILIES = ("sd3", "flux", "qwen-image", "deepfloyd-if")
# The UNet families stream their folder and hub checkpoints unless something needs the whole pipeline in
# PyTorch: a UNet or LoRA fused in (--unet, --lora), or the static int8 modes calibrated by sampling
# (--weights int8-static, --vae-weights int8). Tiny pipelines are built in memory and exported as they are.
UNET_FAMILIES = ("sd15", "sdxl")


# Families streamed unless tiny and fp32: a tiny one exports faster through TorchScript (one dynamo trace of the
# HiDream transformer takes ~20 s), and the int8/int4 weight formats are written only by this module.
BIG_FAMILIES = ("hidream",)


def streamed_source(
    family: str, kind: str, *, parts: bool, vae_weights: str, weights: str = "fp32", text_encoder_weights: str = "fp32"
) -> bool:
    """Whether a source of ``family`` (``kind``: tiny, folder, hub) is exported by this module."""
    if family in STREAMED_FAMILIES:
        return True
    if family in BIG_FAMILIES:
        return kind != "tiny" or weights != "fp32" or text_encoder_weights != "fp32"
    calibrated = weights == "int8-static" or vae_weights != "fp32"  # sampled by the pipeline in memory
    return family in UNET_FAMILIES and kind != "tiny" and not parts and not calibrated


def streams(module) -> bool:
    return type(module).__name__ in STREAMED_CLASSES


def on_meta(module) -> bool:
    return any(p.is_meta for p in module.parameters())


# --- the module without weights --------------------------------------------------------------------


def build(cls, config, *, meta_buffers: bool = True):
    """``cls`` built from ``config`` with its parameters on the meta device; returns (module, buffers): the
    buffers' real values (computed by the constructor: position ids, fixed embeddings) and, with
    ``meta_buffers``, the buffers moved to meta too so that the whole module traces on one device."""
    import torch
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        if hasattr(cls, "from_config") and not hasattr(cls, "config_class"):  # diffusers
            module = cls.from_config(config)
        else:  # transformers
            module = cls(config)
    module.to(torch.float32).eval()  # a config's dtype (bf16 checkpoints say so) must not reach the graph
    buffers = {name: b.detach().clone() for name, b in module.named_buffers() if not b.is_meta}
    if meta_buffers:
        for sub in module.modules():
            for name, buf in list(sub._buffers.items()):
                if buf is not None and not buf.is_meta:
                    sub._buffers[name] = buf.to(torch.device("meta"))
    return module, buffers


def config_of(module):
    """What ``build`` needs to rebuild ``module``'s class: a diffusers config dict or a transformers config."""
    cfg = module.config
    return dict(cfg) if isinstance(cfg, dict) else cfg


# --- where the weights come from -------------------------------------------------------------------


class SafetensorsWeights:
    """A component folder's safetensors (one file, or shards with an index), read one tensor at a time.

    Read with plain file reads, not memory-mapped: pages of a mapped shard count in the process's resident
    set as they are touched, so mapping made the export's peak grow with the model (5.1 → 6.5 GB from one
    FLUX unit to two); a read costs one tensor's memory, whatever the shard's size."""

    DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64, "I32": np.int32}
    CHUNK = 1 << 22  # values widened at a time

    def __init__(self, folder: Path):
        import json

        self.folder = Path(folder)
        self.where: dict[str, tuple[Path, str, list, int, int]] = {}  # name → (file, dtype, shape, offset, bytes)
        for file in sorted(self.folder.glob("*.safetensors")):
            with open(file, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(size))
            for name, info in header.items():
                if name != "__metadata__":
                    begin, end = info["data_offsets"]
                    self.where[name] = (file, info["dtype"], info["shape"], 8 + size + begin, end - begin)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def keys(self):
        return self.where.keys()

    def params(self) -> int:
        """How many values the files hold, from their headers alone."""
        return sum(int(np.prod(shape)) for _, _, shape, _, _ in self.where.values())

    def array(self, name: str) -> np.ndarray:
        """The tensor as float32 (bf16 and fp16 widened exactly), integer tensors as stored."""
        file, dtype, shape, offset, nbytes = self.where[name]
        if dtype not in self.DTYPES:
            raise ValueError(f"{file.name}: tensor {name} is {dtype}, which the exporter does not read")
        kind = np.dtype(self.DTYPES[dtype])
        count = nbytes // kind.itemsize
        with open(file, "rb") as handle:
            handle.seek(offset)
            if dtype not in ("BF16", "F16"):
                return np.fromfile(handle, dtype=kind, count=count).reshape(shape)
            # widened a chunk at a time: whole-tensor temporaries of Qwen2.5-VL's 545 M-value embedding table
            # (bf16 → uint32 → shifted) held 5.5 GB where the result is 2.2 GB
            out = np.empty(count, dtype=np.float32)
            for start in range(0, count, self.CHUNK):
                raw = np.fromfile(handle, dtype=kind, count=min(self.CHUNK, count - start))
                if dtype == "BF16":  # the upper half of a float32
                    out.view(np.uint32)[start : start + raw.size] = raw.astype(np.uint32) << 16
                else:
                    out[start : start + raw.size] = raw
        return out.reshape(shape)

    def close(self) -> None:
        pass


class ModuleWeights:
    """A module already in memory (the tiny pipelines) as a checkpoint."""

    def __init__(self, module):
        self.state = module.state_dict()

    def __contains__(self, name: str) -> bool:
        return name in self.state

    def keys(self):
        return self.state.keys()

    def array(self, name: str) -> np.ndarray:
        return _numpy(self.state[name])

    def close(self) -> None:
        self.state = {}


def weights_source(module, folder: Path | None):
    """The checkpoint of a pipeline component: its safetensors folder when it was not loaded, else itself."""
    if on_meta(module):
        if folder is None or not any(folder.glob("*.safetensors")):
            raise FileNotFoundError(f"no safetensors weights in {folder}")
        return SafetensorsWeights(folder)
    return ModuleWeights(module)


def aliases(module) -> dict[str, list[str]]:
    """Every name a parameter or buffer goes by (tied weights: T5's ``shared`` is ``encoder.embed_tokens``)."""
    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {name: names for names in groups.values() for name in names}


def fetch(name: str, checkpoint, buffers: dict, names: dict[str, list[str]], remap=None):
    """The fp32 numpy value of state-dict entry ``name`` (``remap``: reduced-depth name → checkpoint name)."""
    if name in buffers:
        return _numpy(buffers[name])
    key = checkpoint_key(name, checkpoint, names, remap)
    if key is None:
        raise KeyError(f"the checkpoint has no tensor {name!r}")
    return checkpoint.array(key)


def checkpoint_key(name: str, checkpoint, names: dict[str, list[str]], remap=None) -> str | None:
    """The checkpoint's name for state-dict entry ``name`` (any of its aliases, remapped), None if it has none."""
    for candidate in names.get(name, [name]):
        key = remap(candidate) if remap else candidate
        if key in checkpoint:
            return key
    return None


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing). Reading a
    checkpoint tensor by tensor leaves the heap fragmented: without it IF-I-XL's reduced-depth validation kept
    ~2.6 GB of freed PyTorch memory while ONNX Runtime then ran its graph (measured with the reference's weights
    held in bf16, before they were read while running)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _numpy(tensor) -> np.ndarray:
    """Floating tensors (bf16, fp16 checkpoints) as float32; integer ones (position ids) as they are."""
    return (tensor.float() if tensor.is_floating_point() else tensor).numpy()


# --- trace -----------------------------------------------------------------------------------------


def trace(component, module, opset: int):
    """The ONNX IR of ``component``'s wrapper around the meta ``module`` (no weight values)."""
    import torch
    from torch.export import Dim

    wrapper = type(component.wrapper)(module).eval()
    feeds = component.example("export")
    args = tuple(torch.from_numpy(np.asarray(feeds[name])).to("meta") for name in component.inputs)
    shapes = (tuple({axis: Dim.DYNAMIC for axis in axes} for axes in component.inputs.values()),)
    with quiet(), torch.no_grad(), _silent_exporter(), _two_pass_sequence_group_norm():
        program = torch.onnx.export(
            wrapper,
            args,
            input_names=list(component.inputs),
            output_names=list(component.outputs),
            dynamic_shapes=shapes,
            opset_version=max(opset, MIN_DYNAMO_OPSET),
            dynamo=True,
            optimize=False,  # the optimizer folds constants, which needs the weights' values
            verbose=False,
        )
    return program.model


@contextlib.contextmanager
def _two_pass_sequence_group_norm():
    """GroupNorm over a token sequence (B, C, S) — diffusers' ``Attention.norm_cross``, DeepFloyd IF's text states —
    traced as mean, then the mean of squared deviations. ONNX Runtime's GroupNormalization kernel loses precision
    when a group is nearly constant against its mean, which IF's padding tokens are: 2.5e-3 off (fp64: torch's
    fp32 is 1.3e-5 off) on the tiny IF UNet's empty-prompt states, and a 6-step cascade turned that into 41/255.
    Image feature maps (B, C, H, W) keep the fused op."""
    import torch.nn.functional as F

    original = F.group_norm

    def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
        if input.dim() != 3:
            return original(input, num_groups, weight, bias, eps)
        batch, channels, tokens = input.shape
        grouped = input.reshape(batch, num_groups, -1)
        centred = grouped - grouped.mean(dim=-1, keepdim=True)
        variance = (centred * centred).mean(dim=-1, keepdim=True)
        out = (centred / (variance + eps).sqrt()).reshape(batch, channels, tokens)
        if weight is not None:
            out = out * weight[:, None]
        if bias is not None:
            out = out + bias[:, None]
        return out

    F.group_norm = group_norm
    try:
        yield
    finally:
        F.group_norm = original


@contextlib.contextmanager
def _silent_exporter():
    """The dynamo exporter prints its stages to stdout; our progress line says what is happening."""
    import io
    from contextlib import redirect_stdout

    with redirect_stdout(io.StringIO()):
        yield


# --- write -----------------------------------------------------------------------------------------


@dataclass
class Written:
    params: int  # parameters written
    bytes: int  # bytes of the data file
    formats: dict  # "fp32" / "int8" / "int4" → number of Linear weights in that format
    int8_convs: int = 0  # convolution weights stored int8 per output channel (weights.py)
    fused_attention: int = 0  # Attention ops rewritten as MultiHeadAttention
    bf16_embeddings: int = 0  # token embedding tables stored as bf16 (weights.py)
    bf16_embedding_bytes: int = 0


def write(model, plan, checkpoint, buffers: dict, names: dict, folder: Path, *, remap=None, progress=None) -> Written:
    """Fill the traced ``model``'s initializers from ``checkpoint`` per ``plan`` (weights.plan), one tensor at a
    time, into ``folder/model.onnx_data``; save ``folder/model.onnx``."""
    import onnx_ir as ir

    folder.mkdir(parents=True, exist_ok=True)
    data_name = "model.onnx" + DATA_SUFFIX
    params = 0
    with open(folder / data_name, "wb") as data:
        for index, job in enumerate(plan.jobs):
            source = fetch(job.source, checkpoint, buffers, names, remap)
            params += source.size
            for value, array in job.arrays(source):
                offset = _align(data)
                array = np.ascontiguousarray(array)
                data.write(memoryview(array).cast("B"))  # no bytes copy of a 1 GB table
                dtype = ir.DataType.from_numpy(array.dtype)
                if dtype == ir.DataType.UINT16 and value.type is not None and value.type.dtype == ir.DataType.BFLOAT16:
                    dtype = ir.DataType.BFLOAT16  # bf16 bits (weights.bf16_bits): numpy has no bf16
                tensor = ir.ExternalTensor(
                    data_name,
                    offset,
                    array.nbytes,
                    dtype,
                    shape=ir.Shape(array.shape),
                    name=value.name,
                    base_dir=str(folder),
                )
                value.const_value = tensor
                value.shape = ir.Shape(array.shape)
                value.type = ir.TensorType(tensor.dtype)
                if value.name not in model.graph.initializers:
                    model.graph.register_initializer(value)
            del source
            if progress is not None:
                progress(index + 1, len(plan.jobs))
        size = data.tell()
    _save(model, folder / "model.onnx")
    return Written(
        params=int(params),
        bytes=size,
        formats=dict(plan.formats),
        int8_convs=plan.int8_convs,
        bf16_embeddings=plan.embeddings,
        bf16_embedding_bytes=plan.embedding_bytes,
    )


def _align(handle) -> int:
    offset = handle.tell()
    pad = -offset % ALIGNMENT
    if pad:
        handle.write(b"\0" * pad)
    return offset + pad


def _save(model, path: Path) -> None:
    """The graph with every initializer referring to the data file already written beside it."""
    import onnx
    import onnx_ir as ir

    proto = ir.serde.serialize_model(model)
    onnx.save_model(proto, str(path))


# --- one component, end to end ---------------------------------------------------------------------


def export(
    component, checkpoint, path: Path, *, opset: int, fmt: str, remap=None, progress=None, fuse: bool = True
) -> Written:
    """Trace ``component`` on the meta device and write it to ``path`` in format ``fmt`` (``fuse``: attention as
    ONNX Runtime's MultiHeadAttention; without it the graph keeps only standard ONNX ops besides MatMulNBits)."""
    module, buffers = build(type(component.module), config_of(component.module))
    names = aliases(module)
    model = trace(component, module, opset)
    del module
    fused = attention.fuse(model) if fuse else 0
    plan = weight_formats.plan(model, fmt)
    written = write(model, plan, checkpoint, buffers, names, path.parent, remap=remap, progress=progress)
    written.fused_attention = fused
    if os.environ.get("STEPWISE_KEEP_TRACE"):  # debugging aid: the graph as traced
        _save(model, path.with_name("traced.onnx"))
    return written
