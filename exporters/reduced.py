"""Validating a streamed component against PyTorch without holding it: whole when small, else at reduced depth.

A diffusion transformer or T5-XXL is a stack of identical blocks between an input and an output part. The
reduced build is the same class with the stack cut to its first block(s) — everything outside the blocks
and the kept blocks' weights read from the same checkpoint — exported by the same streaming code, then
compared with PyTorch. What was compared is recorded in the manifest.
"""

from __future__ import annotations

import contextlib
import copy
import re
import shutil
import tempfile
from pathlib import Path

from . import streaming, validate

# class → the repeated stacks: (config key, state-dict prefix of its blocks, blocks kept from the start,
# whether the last block is kept too: SD3's last joint block is built differently, context_pre_only; Qwen-Image's
# so that the step-cache split's blocks graph, every block after the first, has a block at reduced depth)
STACKS = {
    "FluxTransformer2DModel": [
        ("num_layers", "transformer_blocks", 1, False),
        ("num_single_layers", "single_transformer_blocks", 1, False),
    ],
    "SD3Transformer2DModel": [("num_layers", "transformer_blocks", 1, True)],
    "QwenImageTransformer2DModel": [("num_layers", "transformer_blocks", 1, True)],
    "T5EncoderModel": [("num_layers", "encoder.block", 1, False)],
    "CLIPTextModel": [("num_hidden_layers", "text_model.encoder.layers", 1, False)],
    "CLIPTextModelWithProjection": [("num_hidden_layers", "text_model.encoder.layers", 1, False)],
    "Qwen2_5_VLTextModel": [("num_hidden_layers", "layers", 1, False)],
    "LlamaModel": [("num_hidden_layers", "layers", 1, False)],
}


def fp32_bytes(module) -> int:
    return 4 * sum(p.numel() for p in module.parameters())


def _get(config, key):
    return config[key] if isinstance(config, dict) else getattr(config, key)


def _set(config, key, value) -> None:
    if isinstance(config, dict):
        config[key] = value
    else:
        setattr(config, key, value)


def plan(module):
    """(reduced config, remap: reduced state-dict name → the full model's, description) of ``module``."""
    cls = type(module).__name__
    if cls == "UNet2DConditionModel":
        return unet_plan(module)
    if cls == "HiDreamImageTransformer2DModel":
        return hidream_plan(module)
    config = copy.deepcopy(streaming.config_of(module))
    moves: list[tuple[str, dict[int, int]]] = []
    kept = []
    for key, prefix, first, keep_last in STACKS[cls]:
        depth = int(_get(config, key))
        sources = list(range(min(first, depth)))
        if keep_last and depth - 1 not in sources:
            sources.append(depth - 1)
        _set(config, key, len(sources))
        moves.append((prefix, dict(enumerate(sources))))
        kept.append(f"{prefix} {sources} of {depth}")
    patterns = [(re.compile(rf"^{re.escape(prefix)}\.(\d+)\."), table) for prefix, table in moves]

    def remap(name: str) -> str:
        for pattern, table in patterns:
            match = pattern.match(name)
            if match:
                return f"{name[: match.start(1)]}{table[int(match.group(1))]}{name[match.end(1) :]}"
        return name

    return config, remap, "reduced depth: " + "; ".join(kept) + "; everything outside the blocks"


def unet_plan(module):
    """A UNet's blocks are not one stack: each down block keeps its first resnet (+ attention), each up block
    its first and last (the last is the one reading the down block's input as its skip connection, with
    other channels than the others), each attention its first transformer block. The reduced UNet is the
    same class built with ``layers_per_block`` 1 and ``transformer_layers_per_block`` 1, so its skips line
    up by construction; every kept layer has the full model's shapes."""
    config = copy.deepcopy(streaming.config_of(module))
    blocks = len(config["down_block_types"])
    per_block = config["layers_per_block"]
    per_block = [per_block] * blocks if isinstance(per_block, int) else list(per_block)
    up_last = list(reversed(per_block))  # index of each up block's last resnet: its layers_per_block
    config.update(layers_per_block=1, transformer_layers_per_block=1, reverse_transformer_layers_per_block=None)
    up = re.compile(r"^(up_blocks\.(\d+)\.(?:resnets|attentions)\.)1\.")

    def remap(name: str) -> str:
        match = up.match(name)
        if match:
            return f"{match.group(1)}{up_last[int(match.group(2))]}.{name[match.end() :]}"
        return name  # down blocks, transformer blocks: the first ones keep their index

    depth = f"{'/'.join(map(str, per_block))} layers per block"
    what = f"reduced depth: UNet of {depth} → 1 (up blocks: first and last), 1 transformer block per attention"
    return config, remap, what


def hidream_plan(module):
    """HiDream's transformer: its first double-stream and first single-stream block, each with the Llama layer
    (``llama_layers``) and caption projection it reads (one projection per block, then T5's last)."""
    config = copy.deepcopy(streaming.config_of(module))
    double, single = int(config["num_layers"]), int(config["num_single_layers"])
    layers = list(config["llama_layers"])
    kept = [0] + ([double] if single else [])  # block index (over both stacks) of each kept block
    config.update(num_layers=min(double, 1), num_single_layers=min(single, 1))
    config["llama_layers"] = [layers[i] for i in kept]
    projections = {i: full for i, full in enumerate([*kept, double + single])}
    projection = re.compile(r"^caption_projection\.(\d+)\.")

    def remap(name: str) -> str:
        match = projection.match(name)
        if match:
            return f"caption_projection.{projections[int(match.group(1))]}.{name[match.end() :]}"
        return name  # double_stream_blocks.0 / single_stream_blocks.0 keep their index

    what = (
        f"reduced depth: double_stream_blocks [0] of {double}; single_stream_blocks [0] of {single}; "
        f"llama_layers {config['llama_layers']}; everything outside the blocks"
    )
    return config, remap, what


# Classes whose reduced build may read its weights while it runs (see ``materialize``): every module reads only
# its own parameters in its forward. Not T5, whose feed-forward casts its input to ``wo.weight.dtype``.
READ_WHILE_RUNNING = {"UNet2DConditionModel"}


def materialize(cls, config, checkpoint, remap=None, *, on_demand: bool = False):
    """``cls`` built from ``config`` on the CPU with its weights (fp32) read from ``checkpoint``.

    ``on_demand``: the parameters stay on the meta device and each module reads its own from the checkpoint
    (fp32) for the length of its forward, so the fp32 results are unchanged while at most one module's weights
    are held: IF-I-XL's reduced-depth UNet is 2.4 B parameters, 9.5 GB in fp32 (4.8 GB even held as bf16)."""

    module, buffers = streaming.build(cls, config, meta_buffers=False)
    names = streaming.aliases(module)
    if on_demand:
        _read_while_running(module, checkpoint, buffers, names, remap)
        return module.eval()
    state = {}
    for name in module.state_dict():
        if name not in buffers:  # parameters; buffers keep their constructed values, as the streamed graph
            state[name] = _tensor(streaming.fetch(name, checkpoint, buffers, names, remap))
    module.load_state_dict(state, strict=False, assign=True)
    left = [n for n, p in module.named_parameters() if p.is_meta]
    if left:
        raise KeyError(f"the checkpoint has no tensor {left[0]!r}")
    return module.eval()


def _read_while_running(module, checkpoint, buffers: dict, names: dict, remap) -> None:
    """Each submodule's own parameters are read from ``checkpoint`` before its forward and dropped after it
    (the meta ones put back): a module that reads another's weights meets a meta tensor and fails loudly."""
    import torch

    for prefix, sub in module.named_modules():
        own = {n: f"{prefix}.{n}" if prefix else n for n, _ in sub.named_parameters(recurse=False)}
        if not own:
            continue
        for name in own.values():  # a missing tensor is found before anything runs
            if streaming.checkpoint_key(name, checkpoint, names, remap) is None:
                raise KeyError(f"the checkpoint has no tensor {name!r}")
        empty = {n: sub._parameters[n] for n in own}

        def read(mod, args, own=own):
            for n, name in own.items():
                tensor = _tensor(streaming.fetch(name, checkpoint, buffers, names, remap))
                mod._parameters[n] = torch.nn.Parameter(tensor, requires_grad=False)

        def drop(mod, args, output, empty=empty):
            mod._parameters.update(empty)

        sub.register_forward_pre_hook(read)
        sub.register_forward_hook(drop)


def _tensor(value):
    """A checkpoint read as a torch tensor: a fresh array is not copied (a 2.2 GB embedding table would be held
    twice); a read-only one (a tiny module's own weights) is."""
    import torch

    return torch.from_numpy(value if value.flags.writeable else value.copy())


@contextlib.contextmanager
def _without_onednn():
    """PyTorch's own convolutions: oneDNN's reorder each fp32 weight into its blocked layout, a second copy of
    the widest one for the call (IF-I-XL's 544 MB conv: the reference phase peaked 6.1 GB, 5.6 without)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TF32 acceleration")  # said on each switch, about GPUs
        with torch.backends.mkldnn.flags(enabled=False):
            yield


def check(component, checkpoint, path: Path, *, opset: int, fmt: str, tolerances: dict, fuse: bool = True) -> dict:
    """Validate the streamed graph at ``path`` of ``component`` (whose module may be on the meta device)."""
    module = component.module
    cls = type(module)
    config, remap, what = plan(module)
    small_enough = fp32_bytes(module) <= streaming.FULL_VALIDATION_BYTES
    if small_enough or config == streaming.config_of(module):  # nothing to cut: a shallow model is its own build
        real = module if not streaming.on_meta(module) else materialize(cls, streaming.config_of(module), checkpoint)
        refs = validate.references(component.rebuild(real))
        del real
        result = validate.check(component, path, refs, **tolerances)
        result["compared"] = "whole" if small_enough else "whole (no deeper than its reduced-depth build)"
        return result
    on_demand = cls.__name__ in READ_WHILE_RUNNING
    with _without_onednn() if on_demand else contextlib.nullcontext():
        refs = validate.references(component.rebuild(materialize(cls, config, checkpoint, remap, on_demand=on_demand)))
    streaming.release_freed_memory()  # the reduced build, before ONNX Runtime loads its graph
    # the reduced build's weights are freed before its graph is written and run: only its structure is traced
    small = component.rebuild(streaming.build(cls, config)[0])
    work = Path(tempfile.mkdtemp(prefix=".reduced-", dir=path.parent.parent))
    try:
        streaming.export(small, checkpoint, work / "model.onnx", opset=opset, fmt=fmt, remap=remap, fuse=fuse)
        small = validate.Names(small)  # the graph's names only: the PyTorch module can go
        result = validate.check(small, work / "model.onnx", refs, **tolerances)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["compared"] = what
    result["graph"] = validate.graph_signature(path)
    return result
