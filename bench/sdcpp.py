"""stable-diffusion.cpp (the ``stable-diffusion-cpp-python`` package) on the same diffusers pipeline folder
as ours (FLUX.1, SD 3 / 3.5 or Qwen-Image, bf16 safetensors shards as ``random_weights`` writes them): seconds
per step, load seconds and peak RSS, one JSON line per run.

stable-diffusion.cpp does not read a diffusers folder of these models: its loader wants one file per
component, and for the transformer the original single-file layout (Black Forest Labs' ``double_blocks.0.
img_attn.qkv.weight``..., Stability's ``joint_blocks.0.x_block.attn.qkv.weight``...). It has diffusers →
original name tables (``name_conversion.cpp``), but they serve LoRAs: the version detection looks for the
original names, and a split ``to_q``/``to_k``/``to_v`` maps to ``qkv.weight``/``qkv.weight.1``/
``qkv.weight.2``, which the model loader does not fuse. So:

1. the transformer is rewritten in the original layout (``transformer_plan``: the exact inverse of diffusers'
   ``convert_flux_transformer_checkpoint_to_diffusers`` / ``convert_sd3_transformer_checkpoint_to_diffusers``:
   q/k/v (and FLUX's single-block MLP input) concatenated into ``qkv``/``linear1``, the final
   AdaLayerNormContinuous (and SD3's last context block's) scale/shift halves swapped back). Every step is
   a byte copy along dim 0 in the tensors' own dtype (``write_safetensors``), so memory stays at one chunk;
2. each component goes through stable-diffusion.cpp's own converter to GGUF (``sdcpp_worker.py convert``):
   by default the transformer q4_0, T5-XXL q8_0, CLIP f16, VAE f16 (``--types``). The converter holds its
   whole output in memory, so it is fed ``--shard-gib`` at a time: the transformer's original layout is
   written a piece at a time (each converted, then deleted), a sharded text encoder is converted shard by
   shard, and the GGUF pieces are joined (``merge_gguf``: byte-identical to converting the whole file at
   once). Disk: the GGUFs plus one piece; memory: one piece's GGUF;
3. one generation per size (``sdcpp_worker.py generate``) in a child process under stable-diffusion-cpp-
   python's interpreter (``--python``; it is not the project's venv): seconds per step from its log's
   ``sampling completed, taking X s`` over the steps, load seconds = the ``StableDiffusion(...)`` constructor,
   peak RSS = the child's ``ru_maxrss`` from ``os.wait4``.

Qwen-Image (``QwenImagePipeline``; the names below are stable-diffusion.cpp's as of the sources vendored by
stable-diffusion-cpp-python 0.4.7, leejet/stable-diffusion.cpp 90e87bc8): its ``QwenImageModel`` is written
with diffusers' names (the version is recognised by ``transformer_blocks.0.img_mod.1.weight``), so the
transformer goes as it is. The Qwen2.5-VL text encoder goes to ``llm_path`` under the hub's names
(``model.embed_tokens``, ``model.layers.N``..., ``model.norm``) without ``lm_head`` and the vision tower
(``visual.*``), which a text-to-image run (``vae_decode_only``) never loads: less to convert. The VAE is the
Wan 2.1 VAE, loaded under the original Wan names (``qwen_vae_names``: ``conv_in`` → ``conv1``, resnets'
``norm1/conv1/norm2/conv2`` → ``residual.0/2/3/6``, the decoder's up blocks flattened into ``upsamples.N``...).
Its widths are fixed there: the transformer 24 heads × 128 with a 3584-wide text input, the text encoder 28
query / 4 key-value heads × 128 (its depth, width, vocabulary and MLP width are read from the file, but the
heads fix the width at 3584, and stable-diffusion.cpp's own Qwen2 tokenizer emits ids up to 151 645), the VAE
96 wide, z_dim 16, 2 residual blocks a level. A narrowed Qwen-Image is refused (``sdcpp_refusal``); its depths
(transformer blocks, text layers) are read from the files, so ``qwen-image@u1`` loads. CFG 4.0 with the
negative prompt " " (diffusers' QwenImagePipeline's true CFG, as ours runs it), and stable-diffusion.cpp's
constant ``flow_shift`` set to e^mu, the shift diffusers' dynamic ``exponential`` shifting applies at that
image size (``qwen_flow_shift``; stable-diffusion.cpp's default would be 3.0). diffusers' ``shift_terminal``
stretch has no counterpart there; it moves the sigmas, not the work per step.

Depth: FLUX's double/single block counts are inferred from the tensors, so a reduced-depth build
(``flux-schnell@u1``) loads. SD3's is not: ``MMDiT`` takes depth = max(24, blocks) and its width as
64 × depth, so a reduced-depth SD 3.5 Large (2432 wide, fewer than 38 blocks) cannot load (refused here,
with the reason). T5-XXL's 24 blocks are fixed: a reduced T5 is left out (``"t5": "omitted ..."``) and
stable-diffusion.cpp conditions on CLIP alone; the per-step time does not depend on it.

``python -m bench.sdcpp FOLDER --size 512 --threads 2 --out DIR``. Nothing here is imported by the product.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

WORKER = Path(__file__).with_name("sdcpp_worker.py")
DEFAULT_PYTHON = os.environ.get("STEPWISE_SDCPP_PYTHON", "/work/sdcpp-venv/bin/python")
COPY_CHUNK = 1 << 26  # bytes copied at a time
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# GGUF bytes per bf16 byte, roughly (quantized types keep 1-D tensors and the embedders as they are)
TYPE_RATIO = {"q4_0": 0.30, "q4_1": 0.33, "q5_0": 0.36, "q8_0": 0.55, "f16": 1.0, "bf16": 1.0, "f32": 2.0}
DEFAULT_TYPES = {"diffusion": "q4_0", "t5": "q8_0", "clip": "f16", "llm": "q8_0", "vae": "f16"}
T5_BLOCKS = 24  # stable-diffusion.cpp's T5Params.num_layers, fixed
PIPELINES = {
    # component folder → (StableDiffusion argument, kind for --types)
    "FluxPipeline": {
        "transformer": ("diffusion_model_path", "diffusion"),
        "text_encoder": ("clip_l_path", "clip"),
        "text_encoder_2": ("t5xxl_path", "t5"),
        "vae": ("vae_path", "vae"),
    },
    "StableDiffusion3Pipeline": {
        "transformer": ("diffusion_model_path", "diffusion"),
        "text_encoder": ("clip_l_path", "clip"),
        "text_encoder_2": ("clip_g_path", "clip"),
        "text_encoder_3": ("t5xxl_path", "t5"),
        "vae": ("vae_path", "vae"),
    },
    "QwenImagePipeline": {
        "transformer": ("diffusion_model_path", "diffusion"),
        "text_encoder": ("llm_path", "llm"),
        "vae": ("vae_path", "vae"),
    },
}
# registry defaults: FLUX.1-schnell runs without CFG, SD 3.5 Large with CFG 3.5, Qwen-Image with true CFG 4.0
# (two evaluations a step)
CFG_SCALE = {"FluxPipeline": 1.0, "StableDiffusion3Pipeline": 3.5, "QwenImagePipeline": 4.0}
PROMPT = "a lighthouse at dusk"
NEGATIVE_PROMPT = {"QwenImagePipeline": " "}  # QwenImagePipeline's negative when CFG is on and none is given


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ safetensors, read and written by hand


@dataclass(frozen=True)
class Tensor:
    """One tensor of a safetensors file: where its bytes are (absolute offsets in ``path``)."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> dict[str, Tensor]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    base = 8 + length
    return {
        name: Tensor(
            Path(path), e["dtype"], tuple(e["shape"]), base + e["data_offsets"][0], base + e["data_offsets"][1]
        )
        for name, e in header.items()
    }


def component_tensors(directory: Path) -> dict[str, Tensor]:
    """Every tensor of the safetensors files of one component folder (sharded or not), by name."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{directory}: no safetensors")
    tensors: dict[str, Tensor] = {}
    for path in files:
        for name, tensor in read_header(path).items():
            if name in tensors:
                raise SystemExit(f"{directory}: {name} in {tensors[name].path.name} and {path.name}")
            tensors[name] = tensor
    return tensors


# An output tensor is a list of parts along dim 0: (source name, None) for the whole tensor, (name, 0) or
# (name, 1) for its first or second half.
Part = tuple[str, int | None]
Plan = list[tuple[str, list[Part]]]


def output_shape(parts: list[Part], tensors: dict[str, Tensor]) -> tuple[str, tuple[int, ...]]:
    dtypes = {tensors[n].dtype for n, _ in parts}
    rests = {tensors[n].shape[1:] for n, _ in parts}
    if len(dtypes) != 1 or len(rests) != 1:
        raise ValueError(f"cannot concatenate {[(n, tensors[n].dtype, tensors[n].shape) for n, _ in parts]}")
    rows = 0
    for name, half in parts:
        n = tensors[name].shape[0]
        if half is not None:
            if n % 2:
                raise ValueError(f"{name}: {n} rows do not halve")
            n //= 2
        rows += n
    return dtypes.pop(), (rows, *rests.pop())


def safetensors_header(entries: list[tuple[str, str, tuple[int, ...]]]) -> tuple[bytes, list[int]]:
    """The 8-byte length + JSON header (padded to 8) for ``(name, dtype, shape)`` back to back, and the sizes."""
    header: dict = {"__metadata__": {"format": "pt", "writer": "bench.sdcpp"}}
    sizes, offset = [], 0
    for name, dtype, shape in entries:
        size = DTYPE_BYTES[dtype]
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        sizes.append(size)
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, sizes


def write_safetensors(path: Path, plan: Plan, tensors: dict[str, Tensor]) -> int:
    """Write ``plan``'s tensors to ``path`` (via ``path.tmp``, renamed when complete), copying the source
    bytes ``COPY_CHUNK`` at a time. Returns the bytes written."""
    entries = [(name, *output_shape(parts, tensors)) for name, parts in plan]
    head, sizes = safetensors_header(entries)
    tmp = path.with_name(path.name + ".tmp")
    handles: dict[Path, object] = {}
    try:
        with open(tmp, "wb") as out:
            out.write(head)
            for (name, parts), size in zip(plan, sizes, strict=True):
                written = 0
                for src, half in parts:
                    t = tensors[src]
                    start, count = t.start, t.nbytes
                    if half is not None:
                        count //= 2
                        start += half * count
                    f = handles.get(t.path) or handles.setdefault(t.path, open(t.path, "rb"))
                    f.seek(start)
                    while count:
                        data = f.read(min(COPY_CHUNK, count))
                        if not data:
                            raise OSError(f"{t.path}: truncated in {src}")
                        out.write(data)
                        count -= len(data)
                        written += len(data)
                if written != size:
                    raise AssertionError(f"{name}: wrote {written} bytes, header says {size}")
        os.replace(tmp, path)
    finally:
        for f in handles.values():
            f.close()
        tmp.unlink(missing_ok=True)
    return len(head) + sum(sizes)


# ------------------------------------------------------------------ GGUF, merged by hand

GGUF_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT: stable-diffusion.cpp's converter writes no general.alignment


@dataclass(frozen=True)
class GGUFInfo:
    """The parts of a GGUF file (v2/v3, no key-value pairs) that a merge needs."""

    path: Path
    version: int
    infos: list[tuple[bytes, tuple[int, ...], int, int]]  # name, dims, ggml type, offset in the data section
    data_start: int
    data_bytes: int


def read_gguf(path: Path) -> GGUFInfo:
    with open(path, "rb") as f:
        magic, version, n_tensors, n_kv = struct.unpack("<4sIQQ", f.read(24))
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"{path}: not a GGUF v2/v3 file")
        if n_kv:
            raise ValueError(f"{path}: {n_kv} key-value pairs; stable-diffusion.cpp's converter writes none")
        infos = []
        for _ in range(n_tensors):
            (length,) = struct.unpack("<Q", f.read(8))
            name = f.read(length)
            (n_dims,) = struct.unpack("<I", f.read(4))
            dims = struct.unpack(f"<{n_dims}q", f.read(8 * n_dims))
            ggml_type, offset = struct.unpack("<IQ", f.read(12))
            infos.append((name, dims, ggml_type, offset))
        start = -(-f.tell() // GGUF_ALIGNMENT) * GGUF_ALIGNMENT
    return GGUFInfo(Path(path), version, infos, start, os.path.getsize(path) - start)


def merge_gguf(parts: list[Path], target: Path) -> None:
    """One GGUF of the tensors of ``parts`` (each a file of stable-diffusion.cpp's converter), in order: their
    data sections back to back, each padded to the alignment, so every tensor's offset is the previous one's
    plus its padded size, as ggml's reader checks. Each part is deleted once copied."""
    if len(parts) == 1:
        os.replace(parts[0], target)
        return
    files = [read_gguf(p) for p in parts]
    head = bytearray(struct.pack("<4sIQQ", b"GGUF", files[0].version, sum(len(g.infos) for g in files), 0))
    base = 0
    for g in files:
        for name, dims, ggml_type, offset in g.infos:
            head += struct.pack("<Q", len(name)) + name + struct.pack(f"<I{len(dims)}q", len(dims), *dims)
            head += struct.pack("<IQ", ggml_type, base + offset)
        base += -(-g.data_bytes // GGUF_ALIGNMENT) * GGUF_ALIGNMENT
    head += b"\0" * (-len(head) % GGUF_ALIGNMENT)
    tmp = target.with_name(target.name + ".tmp")
    try:
        with open(tmp, "wb") as out:
            out.write(head)
            for g in files:
                with open(g.path, "rb") as f:
                    f.seek(g.data_start)
                    while data := f.read(COPY_CHUNK):
                        out.write(data)
                out.write(b"\0" * (-g.data_bytes % GGUF_ALIGNMENT))
                g.path.unlink()
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------ diffusers → original layout


def _blocks(names, prefix: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    return sorted({int(m.group(1)) for n in names if (m := pattern.match(n))})


class _Planner:
    def __init__(self, names):
        self.names = set(names)
        self.used: set[str] = set()
        self.plan: Plan = []

    def has(self, name: str) -> bool:
        return name in self.names

    def add(self, out: str, parts: list[Part]) -> None:
        for name, _ in parts:
            if name not in self.names:
                raise KeyError(f"{out}: the source has no {name}")
            self.used.add(name)
        self.plan.append((out, parts))

    def rename(self, out: str, src: str, wb=("weight", "bias")) -> None:
        for s in wb:
            self.add(f"{out}.{s}", [(f"{src}.{s}", None)])

    def cat(self, out: str, srcs: list[str], wb=("weight", "bias")) -> None:
        for s in wb:
            self.add(f"{out}.{s}", [(f"{src}.{s}", None) for src in srcs])

    def swap(self, out: str, src: str, wb=("weight", "bias")) -> None:
        """diffusers' AdaLayerNormContinuous is (scale, shift), the original (shift, scale): halves swapped."""
        for s in wb:
            self.add(f"{out}.{s}", [(f"{src}.{s}", 1), (f"{src}.{s}", 0)])

    def done(self) -> Plan:
        left = sorted(self.names - self.used)
        if left:
            raise ValueError(f"{len(left)} tensors with no place in the original layout: {', '.join(left[:8])}")
        return self.plan


def flux_plan(names) -> Plan:
    """diffusers FluxTransformer2DModel → Black Forest Labs' layout (what stable-diffusion.cpp loads)."""
    p = _Planner(names)
    p.rename("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    p.rename("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    p.rename("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    p.rename("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    if p.has("time_text_embed.guidance_embedder.linear_1.weight"):  # FLUX.1-dev
        p.rename("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
        p.rename("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    p.rename("txt_in", "context_embedder")
    p.rename("img_in", "x_embedder")
    for i in _blocks(p.names, "transformer_blocks."):
        s, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        p.rename(d + "img_mod.lin", s + "norm1.linear")
        p.rename(d + "txt_mod.lin", s + "norm1_context.linear")
        p.cat(d + "img_attn.qkv", [s + "attn.to_q", s + "attn.to_k", s + "attn.to_v"])
        p.cat(d + "txt_attn.qkv", [s + "attn.add_q_proj", s + "attn.add_k_proj", s + "attn.add_v_proj"])
        p.add(d + "img_attn.norm.query_norm.scale", [(s + "attn.norm_q.weight", None)])
        p.add(d + "img_attn.norm.key_norm.scale", [(s + "attn.norm_k.weight", None)])
        p.add(d + "txt_attn.norm.query_norm.scale", [(s + "attn.norm_added_q.weight", None)])
        p.add(d + "txt_attn.norm.key_norm.scale", [(s + "attn.norm_added_k.weight", None)])
        p.rename(d + "img_mlp.0", s + "ff.net.0.proj")
        p.rename(d + "img_mlp.2", s + "ff.net.2")
        p.rename(d + "txt_mlp.0", s + "ff_context.net.0.proj")
        p.rename(d + "txt_mlp.2", s + "ff_context.net.2")
        p.rename(d + "img_attn.proj", s + "attn.to_out.0")
        p.rename(d + "txt_attn.proj", s + "attn.to_add_out")
    for i in _blocks(p.names, "single_transformer_blocks."):
        s, d = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        p.rename(d + "modulation.lin", s + "norm.linear")
        p.cat(d + "linear1", [s + "attn.to_q", s + "attn.to_k", s + "attn.to_v", s + "proj_mlp"])
        p.add(d + "norm.query_norm.scale", [(s + "attn.norm_q.weight", None)])
        p.add(d + "norm.key_norm.scale", [(s + "attn.norm_k.weight", None)])
        p.rename(d + "linear2", s + "proj_out")
    p.rename("final_layer.linear", "proj_out")
    p.swap("final_layer.adaLN_modulation.1", "norm_out.linear")
    return p.done()


def sd3_plan(names) -> Plan:
    """diffusers SD3Transformer2DModel (SD 3 / 3.5) → Stability's MMDiT layout."""
    p = _Planner(names)
    p.add("pos_embed", [("pos_embed.pos_embed", None)])
    p.rename("x_embedder.proj", "pos_embed.proj")
    p.rename("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    p.rename("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    p.rename("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
    p.rename("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
    p.rename("context_embedder", "context_embedder")
    for i in _blocks(p.names, "transformer_blocks."):
        s, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        pre_only = not p.has(s + "attn.to_add_out.weight")  # the last block: context_pre_only
        p.cat(x + "attn.qkv", [s + "attn.to_q", s + "attn.to_k", s + "attn.to_v"])
        p.cat(c + "attn.qkv", [s + "attn.add_q_proj", s + "attn.add_k_proj", s + "attn.add_v_proj"])
        if p.has(s + "attn.norm_q.weight"):  # SD 3.5's RMS qk-norm
            p.add(x + "attn.ln_q.weight", [(s + "attn.norm_q.weight", None)])
            p.add(x + "attn.ln_k.weight", [(s + "attn.norm_k.weight", None)])
            p.add(c + "attn.ln_q.weight", [(s + "attn.norm_added_q.weight", None)])
            p.add(c + "attn.ln_k.weight", [(s + "attn.norm_added_k.weight", None)])
        p.rename(x + "attn.proj", s + "attn.to_out.0")
        if p.has(s + "attn2.to_q.weight"):  # SD 3.5 Medium's MMDiT-X blocks
            p.cat(x + "attn2.qkv", [s + "attn2.to_q", s + "attn2.to_k", s + "attn2.to_v"])
            if p.has(s + "attn2.norm_q.weight"):
                p.add(x + "attn2.ln_q.weight", [(s + "attn2.norm_q.weight", None)])
                p.add(x + "attn2.ln_k.weight", [(s + "attn2.norm_k.weight", None)])
            p.rename(x + "attn2.proj", s + "attn2.to_out.0")
        p.rename(x + "adaLN_modulation.1", s + "norm1.linear")
        p.rename(x + "mlp.fc1", s + "ff.net.0.proj")
        p.rename(x + "mlp.fc2", s + "ff.net.2")
        if pre_only:
            p.swap(c + "adaLN_modulation.1", s + "norm1_context.linear")
        else:
            p.rename(c + "adaLN_modulation.1", s + "norm1_context.linear")
            p.rename(c + "attn.proj", s + "attn.to_add_out")
            p.rename(c + "mlp.fc1", s + "ff_context.net.0.proj")
            p.rename(c + "mlp.fc2", s + "ff_context.net.2")
    p.rename("final_layer.linear", "proj_out")
    p.swap("final_layer.adaLN_modulation.1", "norm_out.linear")
    return p.done()


def same_names_plan(names) -> Plan:
    """Every tensor as it is (Qwen-Image's transformer: stable-diffusion.cpp loads diffusers' names)."""
    return [(n, [(n, None)]) for n in names]


def transformer_plan(kind: str, names) -> Plan:
    return {"FluxPipeline": flux_plan, "StableDiffusion3Pipeline": sd3_plan, "QwenImagePipeline": same_names_plan}[
        kind
    ](names)


# AutoencoderKLQwenImage (diffusers) → the Wan 2.1 VAE's own names, which stable-diffusion.cpp's WAN::WanVAE
# declares (wan.hpp: Encoder3d / Decoder3d / ResidualBlock / AttentionBlock / Resample / RMS_norm)
_VAE_TOP = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
_VAE_ENDS = {"conv_in": "conv1", "norm_out": "head.0", "conv_out": "head.2"}  # head.1 is the SiLU
_VAE_MIDDLE = {("resnets", "0"): "middle.0", ("attentions", "0"): "middle.1", ("resnets", "1"): "middle.2"}
# ResidualBlock.residual = (RMS_norm, SiLU, CausalConv3d, RMS_norm, SiLU, Dropout, CausalConv3d)
_VAE_RESIDUAL = {
    "norm1": "residual.0",
    "conv1": "residual.2",
    "norm2": "residual.3",
    "conv2": "residual.6",
    "conv_shortcut": "shortcut",
}


def qwen_vae_names(names) -> dict[str, str]:
    """AutoencoderKLQwenImage's state-dict names → the Wan 2.1 VAE's (Comfy-Org's qwen_image_vae layout).

    The encoder's ``down_blocks`` are already one flat list (residual blocks and resamples) like Wan's
    ``downsamples``; the decoder's ``up_blocks.b`` (``resnets.r`` then ``upsamplers.0``) are flattened into
    ``upsamples.(b·(R+1) + r)`` and ``upsamples.(b·(R+1) + R)`` with R residual blocks a level (3: 4b+r, 4b+3).
    Attention (``norm``/``to_qkv``/``proj``), resample (``resample.1``, ``time_conv``) and the RMS norms'
    ``gamma`` keep their names. Raises ValueError on a name with no place in that layout."""
    names = list(names)
    ups = [n.split(".") for n in names if n.startswith("decoder.up_blocks.")]
    per_level = 1 + max((int(p[4]) for p in ups if p[3] == "resnets"), default=-1) + 1
    out = {}
    for name in names:
        parts = name.split(".")
        if parts[0] in _VAE_TOP:
            out[name] = ".".join([_VAE_TOP[parts[0]], *parts[1:]])
            continue
        side, body = parts[0], parts[1:]
        if side not in ("encoder", "decoder") or not body:
            raise ValueError(f"{name}: not an AutoencoderKLQwenImage tensor")
        if body[0] in _VAE_ENDS:
            block, tail = _VAE_ENDS[body[0]], body[1:]
        elif body[0] == "mid_block" and tuple(body[1:3]) in _VAE_MIDDLE:
            block, tail = _VAE_MIDDLE[tuple(body[1:3])], body[3:]
        elif side == "encoder" and body[0] == "down_blocks":
            block, tail = f"downsamples.{int(body[1])}", body[2:]
        elif side == "decoder" and body[0] == "up_blocks" and body[2] == "resnets":
            block, tail = f"upsamples.{int(body[1]) * per_level + int(body[3])}", body[4:]
        elif side == "decoder" and body[0] == "up_blocks" and body[2:4] == ["upsamplers", "0"]:
            block, tail = f"upsamples.{int(body[1]) * per_level + per_level - 1}", body[4:]
        else:
            raise ValueError(f"{name}: no place in the Wan VAE layout")
        if tail and tail[0] in _VAE_RESIDUAL:
            tail = [_VAE_RESIDUAL[tail[0]], *tail[1:]]
        out[name] = ".".join([side, block, *tail])
    if len(set(out.values())) != len(out):
        raise ValueError("two AutoencoderKLQwenImage tensors map to one Wan name")
    return out


def component_plan(kind: str, role: str, names) -> Plan | None:
    """What stable-diffusion.cpp is given for one component, or None: its files converted as they are."""
    if role == "diffusion":
        return transformer_plan(kind, names)
    if kind == "QwenImagePipeline" and role == "vae":
        return [(wan, [(n, None)]) for n, wan in qwen_vae_names(sorted(names)).items()]
    if kind == "QwenImagePipeline" and role == "llm":  # the language model alone: no lm_head, no vision tower
        return [(n, [(n, None)]) for n in sorted(names) if n.startswith("model.")]
    return None


# stable-diffusion.cpp's fixed Qwen-Image widths (QwenImageParams, LLMParams for QWEN2_5_VL, WAN::WanVAE)
QWEN_WIDTH = 24 * 128  # the transformer's heads × head_dim
QWEN_TEXT_WIDTH = 3584  # joint_attention_dim = the text encoder's 28 × 128
QWEN_TEXT_KV = 4 * 128
QWEN_TOKEN_IDS = 151_646  # its Qwen2 tokenizer's ids reach <|im_end|> = 151645
QWEN_VAE = {"decoder.conv_in.weight": (384, 16, 3, 3, 3), "decoder.up_blocks.0.resnets.2.conv1.weight": None}


def qwen_refusal(role: str, tensors: dict[str, Tensor]) -> str | None:
    def shape(name):
        return tensors[name].shape if name in tensors else None

    if role == "diffusion":
        want = {"img_in.weight": (QWEN_WIDTH, 64), "txt_in.weight": (QWEN_WIDTH, QWEN_TEXT_WIDTH)}
        why = "24 heads × 128 wide (3072), a 3584-wide text input and 64 input channels"
    elif role == "llm":
        embed = shape("model.embed_tokens.weight")
        want = {
            "model.layers.0.self_attn.q_proj.weight": (QWEN_TEXT_WIDTH, QWEN_TEXT_WIDTH),
            "model.layers.0.self_attn.k_proj.weight": (QWEN_TEXT_KV, QWEN_TEXT_WIDTH),
        }
        why = "Qwen2.5-VL's 28 query / 4 key-value heads × 128 (3584 wide)"
        if embed is not None and embed[0] < QWEN_TOKEN_IDS:
            return f"a {embed[0]}-token vocabulary; stable-diffusion.cpp's Qwen2 tokenizer emits ids up to 151645"
    elif role == "vae":
        if shape("decoder.conv_in.weight") != QWEN_VAE["decoder.conv_in.weight"] or (
            "decoder.up_blocks.0.resnets.2.conv1.weight" not in tensors
            or "decoder.up_blocks.0.resnets.3.conv1.weight" in tensors
        ):
            return (
                "stable-diffusion.cpp's Wan VAE is fixed at 96 wide, z_dim 16, dim_mult (1, 2, 4, 4), 2 residual "
                f"blocks a level; this one's decoder.conv_in is {shape('decoder.conv_in.weight')}"
            )
        return None
    else:
        return None
    found = {n: shape(n) for n in want}
    if found != want:
        return f"stable-diffusion.cpp's Qwen-Image {role} is fixed at {why}: expected {want}, found {found}"
    return None


def sdcpp_refusal(kind: str, tensors: dict[str, Tensor], role: str = "diffusion") -> str | None:
    """Why stable-diffusion.cpp cannot load this component, or None."""
    if kind == "QwenImagePipeline":
        return qwen_refusal(role, tensors)
    if kind != "StableDiffusion3Pipeline" or role != "diffusion":
        return None
    depth = len(_blocks(tensors, "transformer_blocks."))
    width = tensors["context_embedder.weight"].shape[0]
    inferred = 64 * max(24, depth)
    if inferred != width:
        return (
            f"stable-diffusion.cpp's MMDiT infers its width as 64 × max(24, blocks) = {inferred}; this transformer "
            f"is {width} wide with {depth} blocks (a reduced-depth build): only the full depth "
            f"({width // 64} blocks) loads"
        )
    return None


# ------------------------------------------------------------------ the child processes


def run_child(cmd: list[str], log: Path) -> tuple[int, float, float, str]:
    """Run ``cmd`` with stdout+stderr to ``log``: (return code, seconds, peak RSS MB, its output)."""
    started = time.monotonic()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - started
    return proc.returncode, seconds, usage.ru_maxrss / 1024, log.read_text(errors="replace")


def _result(output: str) -> dict | None:
    for line in reversed(output.splitlines()):
        if line.startswith("SDCPP_RESULT "):
            return json.loads(line.removeprefix("SDCPP_RESULT "))
    return None


def _log_seconds(output: str, what: str) -> float | None:
    m = re.findall(rf"{re.escape(what)} completed, taking ([0-9.]+)\s*s", output)
    return float(m[-1]) if m else None


def _free(path: Path) -> int:
    return shutil.disk_usage(path).free


def _need(path: Path, nbytes: float, what: str) -> None:
    free = _free(path)
    if free < nbytes + 2**28:
        raise SystemExit(f"{what}: needs {nbytes / 2**30:.1f} GiB on {path}, {free / 2**30:.1f} GiB free")


def _stamp(paths: list[Path], extra: dict) -> dict:
    return {"sources": [[str(p), p.stat().st_size, int(p.stat().st_mtime)] for p in paths], **extra}


def split_plan(plan: Plan, tensors: dict[str, Tensor], shard_bytes: int) -> list[Plan]:
    """``plan`` cut into consecutive pieces of at most ``shard_bytes`` (a larger tensor alone in its piece)."""
    pieces: list[Plan] = [[]]
    size = 0
    for name, parts in plan:
        nbytes = sum(tensors[n].nbytes // (1 if half is None else 2) for n, half in parts)
        if pieces[-1] and size + nbytes > shard_bytes:
            pieces.append([])
            size = 0
        pieces[-1].append((name, parts))
        size += nbytes
    return pieces if pieces[0] else []


def _convert(python: str, source: Path, target: Path, kind_type: str, log: Path) -> dict:
    """stable-diffusion.cpp's converter, ``source`` → ``target``, in a child: its seconds and peak RSS."""
    spec = {"input": str(source), "output": str(target), "type": kind_type, "rules": ""}
    cmd = [python, str(WORKER), "convert", json.dumps(spec)]
    code, seconds, rss, output = run_child(cmd, log)
    result = _result(output)
    if code or not result or not result["ok"] or not target.exists():
        tail = "\n".join(output.splitlines()[-15:])
        raise SystemExit(f"{source.name}: stable-diffusion.cpp's converter failed (exit {code}), log {log}:\n{tail}")
    return {"seconds": seconds, "peak_rss_mb": rss, "command": shlex.join(cmd)}


def prepare_component(
    kind: str,
    component: str,
    role: str,
    tensors: dict[str, Tensor],
    out: Path,
    python: str,
    kind_type: str,
    shard_bytes: int,
) -> tuple[Path, dict]:
    """One component as stable-diffusion.cpp loads it: a GGUF of ``kind_type`` made by its converter (the
    transformer rewritten in the original layout first), or with ``source`` a safetensors file as it is."""
    sources = sorted({t.path for t in tensors.values()})
    record: dict = {"phase": "convert", "component": component, "type": kind_type}
    started = time.monotonic()
    plan = component_plan(kind, role, tensors)
    if kind_type == "source":  # no GGUF: the original layout / the shards merged, bf16, in one file
        if plan is None and len(sources) == 1:
            return sources[0], {}
        plan = plan or [(n, [(n, None)]) for n in tensors]
        target = out / f"{component}.safetensors"
        _need(out, sum(t.nbytes for t in tensors.values()), f"{component} in one file")
        write_safetensors(target, plan, tensors)
        return target, {**record, "seconds": round(time.monotonic() - started, 1), "bytes": target.stat().st_size}

    target = out / f"{component}-{kind_type}.gguf"
    ratio = TYPE_RATIO.get(kind_type, 1.0)
    if plan is not None:
        pieces = split_plan(plan, tensors, shard_bytes)
    else:
        pieces = [None] * len(sources)  # each source file converted as it is
    _need(out, sum(t.nbytes for t in tensors.values()) * ratio + min(shard_bytes, 2**34), f"{component} → {kind_type}")
    parts, rss, converting = [], 0.0, 0.0
    for k, piece in enumerate(pieces):
        if piece is None:
            staged = sources[k]
        else:  # ≤ shard_bytes of the plan's layout, converted and deleted before the next is written
            staged = out / f"{component}.{k:03d}.safetensors"
            write_safetensors(staged, piece, tensors)
        part = out / f"{component}-{kind_type}.{k:03d}.gguf"
        _progress(f"{component}: stable-diffusion.cpp convert {k + 1}/{len(pieces)} → {kind_type}")
        try:
            done = _convert(python, staged, part, kind_type, out / f"convert-{component}.{k:03d}.log")
        finally:
            if piece is not None:
                staged.unlink(missing_ok=True)
        rss, converting = max(rss, done["peak_rss_mb"]), converting + done["seconds"]
        record["command"] = done["command"]  # the last one: the others differ only in their paths
        parts.append(part)
    merge_gguf(parts, target)
    return target, {
        **record,
        "parts": len(parts),
        "seconds": round(time.monotonic() - started, 1),
        "convert_s": round(converting, 1),
        "peak_rss_mb": round(rss),
        "bytes": target.stat().st_size,
    }


def prepare(
    folder: Path,
    out: Path,
    python: str,
    types: dict[str, str],
    *,
    shard_bytes: int = 2 * 2**30,
    force: bool = False,
    t5: str = "auto",
) -> tuple[dict, list[dict]]:
    """The files stable-diffusion.cpp loads for ``folder`` (StableDiffusion kwargs), made under ``out``
    (reused when their sources, type and shard size are unchanged), and a record of each conversion."""
    kind = json.loads((folder / "model_index.json").read_text())["_class_name"]
    if kind not in PIPELINES:
        raise SystemExit(f"{folder}: {kind}; stable-diffusion.cpp runs here for {', '.join(PIPELINES)}")
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    notes: dict[str, str] = {}
    records: list[dict] = []
    for component, (argument, role) in PIPELINES[kind].items():
        tensors = component_tensors(folder / component)
        why = sdcpp_refusal(kind, tensors, role)
        if why and not force:
            raise SystemExit(f"{folder}: {component}: {why} (--force tries anyway)")
        if role == "t5":
            blocks = len(_blocks(tensors, "encoder.block."))
            if t5 == "omit" or (t5 == "auto" and blocks != T5_BLOCKS):
                notes["t5"] = f"omitted: {blocks} blocks" + (
                    f", stable-diffusion.cpp's T5-XXL has {T5_BLOCKS} fixed" if blocks != T5_BLOCKS else " (--t5 omit)"
                )
                _progress(f"{component}: {notes['t5']}")
                continue
        kind_type = types[role]
        sources = sorted({t.path for t in tensors.values()})
        layout = component_plan(kind, role, tensors) is not None
        stamp = _stamp(sources, {"type": kind_type, "layout": layout, "shard_bytes": shard_bytes})
        stamp_path = out / f"{component}-{kind_type}.json"
        if stamp_path.exists() and json.loads(stamp_path.read_text()).get("stamp") == stamp:
            made = Path(json.loads(stamp_path.read_text())["path"])
            if made.exists():
                _progress(f"{component}: reusing {made}")
                paths[argument] = str(made)
                continue
        made, record = prepare_component(kind, component, role, tensors, out, python, kind_type, shard_bytes)
        if record:
            records.append(record)
        stamp_path.write_text(json.dumps({"stamp": stamp, "path": str(made)}) + "\n")
        paths[argument] = str(made)
    scheduler = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler.read_text()) if scheduler.exists() else {}
    return {"kind": kind, "paths": paths, "notes": notes, "scheduler": config}, records


def qwen_flow_shift(scheduler: dict, width: int, height: int) -> float:
    """e^mu: the shift diffusers' QwenImagePipeline applies at ``width`` × ``height`` (``calculate_shift`` of its
    (H/16)·(W/16) packed tokens, the ``exponential`` time shift), as stable-diffusion.cpp's constant
    ``flow_shift`` (σ' = s·σ / (1 + (s − 1)·σ), the same map for s = e^mu)."""
    base_len, max_len = scheduler.get("base_image_seq_len", 256), scheduler.get("max_image_seq_len", 8192)
    base_shift, max_shift = scheduler.get("base_shift", 0.5), scheduler.get("max_shift", 0.9)
    tokens = (height // 16) * (width // 16)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return math.exp(tokens * slope + base_shift - slope * base_len)


def generate(
    prepared: dict,
    out: Path,
    python: str,
    *,
    size: int,
    steps: int,
    threads: int,
    cfg: float | None,
    seed: int,
    vae_tiling: bool = False,
    model_args: dict | None = None,
    image_args: dict | None = None,
) -> dict:
    kind = prepared["kind"]
    model = {**prepared["paths"], "n_threads": threads, "vae_decode_only": True, "verbose": True, **(model_args or {})}
    image = {
        "prompt": PROMPT,
        "width": size,
        "height": size,
        "sample_steps": steps,
        "sample_method": "euler",
        "cfg_scale": CFG_SCALE[kind] if cfg is None else cfg,
        "seed": seed,
        "vae_tiling": vae_tiling,
    }
    if kind in NEGATIVE_PROMPT and image["cfg_scale"] != 1.0:
        image["negative_prompt"] = NEGATIVE_PROMPT[kind]
    if kind == "QwenImagePipeline" and prepared.get("scheduler", {}).get("use_dynamic_shifting"):
        image["flow_shift"] = round(qwen_flow_shift(prepared["scheduler"], size, size), 4)
    image.update(image_args or {})
    png = out / f"generate-{size}.png"
    cmd = [python, str(WORKER), "generate", json.dumps({"model": model, "image": image, "save": str(png)})]
    log = out / f"generate-{size}.log"
    code, seconds, rss, output = run_child(cmd, log)
    result = _result(output)
    if code or not result:
        tail = "\n".join(output.splitlines()[-25:])
        raise SystemExit(f"stable-diffusion.cpp failed (exit {code}), log {log}:\n{tail}")
    sampling = _log_seconds(output, "sampling")
    params = re.findall(r"total params memory size = ([0-9.]+)MB", output)
    return {
        "sampling_s": sampling,
        "s_per_step": round(sampling / steps, 3) if sampling is not None else None,
        "load_s": round(result["load_s"], 2),
        "encode_s": _log_seconds(output, "get_learned_condition"),
        "decode_s": _log_seconds(output, "decode_first_stage"),
        "generate_s": round(result["generate_s"], 2),
        "process_s": round(seconds, 2),
        "peak_rss_mb": round(rss),
        "params_mb": float(params[-1]) if params else None,
        "progress": result["progress"],
        "image_stats": result.get("image_stats"),
        "image": str(png) if png.exists() else None,
        "cfg_scale": image["cfg_scale"],
        "negative_prompt": image.get("negative_prompt"),
        "flow_shift": image.get("flow_shift"),
        "vae_tiling": vae_tiling,
        "command": shlex.join(cmd),
        "log": str(log),
    }


def _sdcpp_version(python: str) -> str | None:
    try:
        out = subprocess.run(
            [python, "-c", "import importlib.metadata as m; print(m.version('stable-diffusion-cpp-python'))"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def _types(text: str) -> dict[str, str]:
    types = dict(DEFAULT_TYPES)
    for item in filter(None, text.split(",")):
        role, _, kind = item.partition("=")
        if role not in types or not kind:
            raise SystemExit(f"--types: '{item}'; roles {', '.join(types)} = q4_0, q8_0, f16, bf16, source...")
        types[role] = kind
    return types


def _kwargs(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"'{item}': KEY=JSON expected")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sdcpp",
        description="stable-diffusion.cpp on a diffusers FLUX.1 / SD3 / Qwen-Image folder: convert, generate, a JSON "
        "line a run.",
    )
    parser.add_argument("folder", type=Path, help="a diffusers pipeline folder (e.g. bench.random_weights' output)")
    parser.add_argument("--size", type=int, nargs="+", default=[512], help="image side(s), one run each")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--cfg-scale", type=float, default=None, help="default: FLUX 1.0 (no CFG), SD3 3.5, Qwen-Image 4.0"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True, help="converted files, logs and results.jsonl")
    parser.add_argument("--types", default="", help="per role, e.g. diffusion=q4_0,t5=q8_0,clip=f16,llm=q8_0,vae=f16")
    parser.add_argument("--python", default=DEFAULT_PYTHON, help="stable-diffusion-cpp-python's interpreter")
    parser.add_argument(
        "--shard-gib", type=float, default=2.0, help="the transformer is rewritten and converted this much at a time"
    )
    parser.add_argument("--force", action="store_true", help="try a transformer stable-diffusion.cpp cannot load")
    parser.add_argument(
        "--t5",
        choices=("auto", "include", "omit"),
        default="auto",
        help="auto: T5-XXL only with its 24 blocks (stable-diffusion.cpp's are fixed)",
    )
    parser.add_argument("--vae-tiling", action="store_true", help="stable-diffusion.cpp's tiled VAE decode")
    parser.add_argument(
        "--sd",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="a StableDiffusion(...) argument, e.g. flash_attn=true",
    )
    parser.add_argument("--gen", action="append", default=[], metavar="KEY=JSON", help="a generate_image(...) argument")
    parser.add_argument("--convert-only", action="store_true")
    args = parser.parse_args(argv)

    folder = args.folder.resolve()
    out = args.out.resolve()
    types = _types(args.types)
    prepared, records = prepare(
        folder, out, args.python, types, shard_bytes=int(args.shard_gib * 2**30), force=args.force, t5=args.t5
    )
    roles = dict.fromkeys(role for _, role in PIPELINES[prepared["kind"]].values())  # this pipeline's, in order
    marker = folder / "bench-complete.json"
    model = json.loads(marker.read_text()).get("model") if marker.exists() else folder.name
    base = {
        "engine": "stable-diffusion.cpp",
        "version": _sdcpp_version(args.python),
        "model": model,
        "folder": str(folder),
        "pipeline": prepared["kind"],
        "format": "gguf " + ", ".join(f"{r} {types[r]}" for r in roles),
        **prepared["notes"],
    }
    results = out / "results.jsonl"
    with open(results, "a") as f:
        for record in records:
            line = json.dumps({**base, **record})
            print(line, flush=True)
            f.write(line + "\n")
        if args.convert_only:
            return
        for size in args.size:
            _progress(f"generating {size}×{size}, {args.steps} step(s), {args.threads} threads")
            run = generate(
                prepared,
                out,
                args.python,
                size=size,
                steps=args.steps,
                threads=args.threads,
                cfg=args.cfg_scale,
                vae_tiling=args.vae_tiling,
                model_args=_kwargs(args.sd),
                image_args=_kwargs(args.gen),
                seed=args.seed,
            )
            line = json.dumps(
                {
                    **base,
                    "phase": "run",
                    "size": size,
                    "steps": args.steps,
                    "threads": args.threads,
                    **run,
                    "bench_command": shlex.join([sys.executable, "-m", "bench.sdcpp", *(argv or sys.argv[1:])]),
                }
            )
            print(line, flush=True)
            f.write(line + "\n")


if __name__ == "__main__":
    main()
