"""Full-size random-weight diffusers pipelines written straight to bf16 safetensors, never held in memory.

``random_model.build`` instantiates the whole pipeline in fp32 and saves it: FLUX.1's transformer alone is
48 GB that way. Here each model component is built on PyTorch's meta device (names and shapes, no storage),
its ``config.json`` written as ``save_pretrained`` writes it, and its safetensors files written by hand:
the header first (every shape is known up front), then the tensors one after another, each generated and
converted to bf16 ``CHUNK`` values at a time. Memory stays at a few chunks whatever the model's size; the
folder is built in a hidden sibling and renamed into place when complete.

Values: each tensor comes from its own ``numpy.random.default_rng(zlib.crc32(f"{seed}/{component}/{name}"))``
and depends on no other tensor:

- 1-D ``*weight`` and any ``*gamma`` (norm scales; AutoencoderKLQwenImage's RMS norms keep theirs as
  ``gamma`` of shape ``(C, 1, 1[, 1])``): 1.0;
- ``*bias``: ``standard_normal(dtype=float32) * 0.02``;
- everything else (linear, conv, embedding, SD3's ``pos_embed`` table):
  ``standard_normal(dtype=float32) / sqrt(fan_in)`` with ``fan_in = prod(shape[1:])``, so every layer
  keeps its input's scale and activations stay finite through the full depth;

rounded to bf16 (round to nearest even). So a reduced-depth build (``flux-schnell@u1``) holds the same
values as the full build in every tensor the two share, block for block; the one exception is SD3's last
JointTransformerBlock (``context_pre_only``), which is built differently from the blocks before it, so the
last block of a reduced SD3 build is not the full build's block at that index.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import struct
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from registry.files import process_alive, replace_folder

from . import random_model

CHUNK = 1 << 22  # values generated, converted and written at a time (16 MB of float32)
BIAS_STD = 0.02
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"
# The pipelines written here, their model components (in random_model.build's order) and tokenizers.
PIPELINES = {
    "StableDiffusion3Pipeline": {
        "models": ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"),
        "tokenizers": {"tokenizer": "clip", "tokenizer_2": "clip-g", "tokenizer_3": "t5"},
    },
    "FluxPipeline": {
        "models": ("transformer", "vae", "text_encoder", "text_encoder_2"),
        "tokenizers": {"tokenizer": "clip", "tokenizer_2": "t5"},
    },
    "StableDiffusionPipeline": {
        "models": ("unet", "vae", "text_encoder"),
        "tokenizers": {"tokenizer": "clip"},
        "extra": {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
    },
    "StableDiffusionXLPipeline": {
        "models": ("unet", "vae", "text_encoder", "text_encoder_2"),
        "tokenizers": {"tokenizer": "clip", "tokenizer_2": "clip-g"},
    },
    "HiDreamImagePipeline": {  # text_encoder_4: LlamaForCausalLM, lm_head included as the hub stores it
        "models": ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4"),
        "tokenizers": {"tokenizer": "clip", "tokenizer_2": "clip-g", "tokenizer_3": "t5", "tokenizer_4": "llama"},
    },
    "QwenImagePipeline": {  # text_encoder: Qwen2_5_VLForConditionalGeneration, vision tower and lm_head included
        "models": ("transformer", "vae", "text_encoder"),
        "tokenizers": {"tokenizer": "qwen"},
    },
    # DeepFloyd IF's cascade, one folder per stage (the config's "stage_2" names the second): pixel space, no VAE
    "IFPipeline": {
        "models": ("unet", "text_encoder"),
        "tokenizers": {"tokenizer": "t5"},
        "extra": {
            "safety_checker": None,
            "feature_extractor": None,
            "watermarker": None,
            "requires_safety_checker": False,
        },
    },
    "IFSuperResolutionPipeline": {  # no T5 of its own: stage I's states condition it (diffusers' IF docs)
        "models": ("unet",),
        "tokenizers": {"tokenizer": "t5"},
        "extra": {
            "text_encoder": None,
            "safety_checker": None,
            "feature_extractor": None,
            "watermarker": None,
            "requires_safety_checker": False,
        },
    },
    # its optional stage III, the SD x4 upscaler: latents and a x4 VAE, its own CLIP (SD 2's OpenCLIP ViT-H text)
    "StableDiffusionUpscalePipeline": {
        "models": ("unet", "vae", "text_encoder"),
        "tokenizers": {"tokenizer": "clip"},
        "extra": {"safety_checker": None, "feature_extractor": None, "watermarker": None, "max_noise_level": 350},
    },
}
# text encoders: their config's "architectures"
_DEFAULT_CLASS = {"transformer": None, "unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}


def tensor_seed(seed: int, component: str, name: str) -> int:
    return zlib.crc32(f"{seed}/{component}/{name}".encode())


def value_chunks(seed: int, component: str, name: str, shape: tuple[int, ...], chunk: int | None = None):
    """The float32 values of one tensor (flattened, C order), ``chunk`` at a time; see the module docstring.
    The chunks concatenated do not depend on ``chunk``."""
    chunk = chunk or CHUNK
    count = math.prod(shape)
    if (len(shape) == 1 and name.endswith("weight")) or name.endswith("gamma"):
        for start in range(0, count, chunk):
            yield np.ones(min(chunk, count - start), dtype=np.float32)
        return
    rng = np.random.default_rng(tensor_seed(seed, component, name))
    scale = np.float32(BIAS_STD) if name.endswith("bias") else None
    fan_in = np.float32(math.sqrt(math.prod(shape[1:])))
    for start in range(0, count, chunk):
        values = rng.standard_normal(min(chunk, count - start), dtype=np.float32)
        if scale is not None:
            values *= scale
        else:
            values /= fan_in
        yield values


def tensor_values(seed: int, component: str, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """One tensor's float32 values in its shape (before the bf16 rounding), all at once."""
    chunks = list(value_chunks(seed, component, name, shape, chunk=max(math.prod(shape), 1)))
    return (chunks[0] if chunks else np.zeros(0, dtype=np.float32)).reshape(shape)


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 → the bf16 bit patterns (little-endian uint16), rounded to nearest even. Overwrites ``values``."""
    u = values.view(np.uint32)
    u += np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))
    u >>= 16
    return u.astype("<u2")


def meta_module(component: str, cfg: dict):
    """The component's model on the meta device (shapes, no storage) and its library (diffusers/transformers),
    with random_model's config handling."""
    import diffusers
    import torch

    with torch.device("meta"):
        if component.startswith("text_encoder"):
            cls, text_config = random_model.text_encoder_class(cfg)
            return cls(text_config), "transformers"
        cls = getattr(diffusers, cfg.get("_class_name") or _DEFAULT_CLASS[component])
        return cls.from_config(random_model._strip(cfg)), "diffusers"


def checkpoint_name(module, name: str) -> str:
    """The name ``save_pretrained`` gives the state-dict entry ``name`` of ``module``. transformers' vision-language
    models (``modeling_utils.VLMS``) are saved under their original checkpoint names, the model's
    ``_checkpoint_conversion_mapping`` run backwards exactly as ``save_pretrained`` (4.57) runs it:
    Qwen2_5_VLForConditionalGeneration's ``model.language_model.layers.0...`` → ``model.layers.0...``,
    ``model.visual...`` → ``visual...``, ``lm_head.weight`` unchanged; the layout of Qwen/Qwen-Image's
    ``text_encoder`` shards (and of Qwen2.5-VL-7B-Instruct's). Every other model: ``name``."""
    mapping = getattr(module, "_checkpoint_conversion_mapping", None) or {}
    if not mapping or not _is_vlm(module):
        return name
    for pattern, replacement in {v: k for k, v in mapping.items()}.items():
        replacement = re.sub(r"\(.*\)", "", replacement.lstrip("^"))
        name, count = re.subn(pattern, replacement, name)
        if count:
            break
    return name


def _is_vlm(module) -> bool:
    """Whether transformers' save_pretrained renames ``module``'s keys (its class or a base named like a VLM)."""
    from transformers.modeling_utils import VLMS

    return any(vlm in cls.__name__.lower() for cls in type(module).__mro__[:-1] for vlm in VLMS)


def saved_tensors(module) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor ``save_pretrained`` writes for ``module``, in state_dict order, under
    the name it is saved as (``checkpoint_name``): the persistent entries, a tied weight once. Of names
    sharing one tensor, transformers drops those matching the model's ``_tied_weights_keys``
    (T5EncoderModel keeps ``shared.weight``, drops ``encoder.embed_tokens.weight``); without a match the
    first name is kept."""
    state = module.state_dict(keep_vars=True)
    aliases: dict[int, list[str]] = {}
    for name, tensor in state.items():
        aliases.setdefault(id(tensor), []).append(name)
    patterns = list(getattr(module, "_tied_weights_keys", None) or [])
    dropped = set()
    for names in aliases.values():
        if len(names) < 2:
            continue
        keep = [n for n in names if not any(re.search(p, n) for p in patterns)] or sorted(names)[-1:]
        dropped.update(n for n in names if n != keep[0])
    kept = [(name, tuple(t.shape)) for name, t in state.items() if name not in dropped]
    return [(checkpoint_name(module, name), shape) for name, shape in kept]


def shard_plan(tensors: list[tuple[str, tuple[int, ...]]], shard_bytes: int) -> list[list[tuple[str, tuple]]]:
    """The tensors cut into consecutive shards of at most ``shard_bytes`` of bf16 (a tensor larger than that
    alone in its shard), in order."""
    shards: list[list] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards if shards[0] else []


def shard_names(weights_name: str, count: int) -> list[str]:
    """``model.safetensors`` alone, or ``model-00001-of-00003.safetensors``... as save_pretrained names them."""
    if count == 1:
        return [weights_name]
    stem = weights_name.removesuffix(".safetensors")
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def safetensors_header(tensors: list[tuple[str, tuple[int, ...]]]) -> bytes:
    """The 8-byte little-endian length and the JSON header (space-padded to a multiple of 8) of a bf16 file
    holding ``tensors`` back to back in this order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        end = offset + 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path: Path, tensors, seed: int, component: str, advance: Callable[[int], object]) -> None:
    """One safetensors file of ``tensors`` with their random values, one chunk in memory at a time."""
    with open(path, "wb") as f:
        f.write(safetensors_header(tensors))
        for name, shape in tensors:
            for values in value_chunks(seed, component, name, shape):
                f.write(bf16_bits(values).data)
                advance(2 * values.size)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


class _Lines:
    """The fallback progress display without tqdm: a line every tenth of the bytes."""

    def __init__(self, total: int, desc: str, progress):
        self.total, self.desc, self.progress, self.done, self.shown = total, desc, progress, 0, 0

    def update(self, n: int) -> None:
        self.done += n
        tenth = self.done * 10 // max(self.total, 1)
        if tenth > self.shown:
            self.shown = tenth
            self.progress(f"  {self.desc}: {_size(self.done)} of {_size(self.total)}")

    def close(self) -> None:
        pass


def _bar(total: int, desc: str, progress):
    try:
        from tqdm import tqdm
    except ImportError:
        return _Lines(total, desc, progress)
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, mininterval=1.0, leave=False)


def model_plan(module, library: str, shard_bytes: int) -> dict:
    """What ``write_model`` writes for ``module``: the tensors, their shards and the files' names."""
    tensors = saved_tensors(module)
    shards = shard_plan(tensors, shard_bytes)
    weights_name = DIFFUSERS_WEIGHTS if library == "diffusers" else TRANSFORMERS_WEIGHTS
    return {
        "weights_name": weights_name,
        "tensors": tensors,
        "shards": shards,
        "files": shard_names(weights_name, len(shards)),
        "bytes": sum(2 * math.prod(shape) for _, shape in tensors),
    }


def write_model(module, library: str, directory: Path, component: str, *, seed: int, shard_bytes: int, progress):
    """``directory/config.json`` and the bf16 safetensors (+ index when sharded) of one meta-device model."""
    directory.mkdir(parents=True, exist_ok=True)
    plan = model_plan(module, library, shard_bytes)
    if library == "diffusers":
        module.save_config(directory)
    else:  # as transformers' save_pretrained sets them before saving the config
        module.config.dtype = "bfloat16"
        module.config.architectures = [type(module).__name__]
        module.config.save_pretrained(directory)
    values = sum(math.prod(shape) for _, shape in plan["tensors"])
    progress(
        f"{component} ({type(module).__name__}): {values / 1e6:,.1f} M values, {_size(plan['bytes'])} bf16 in "
        f"{len(plan['files'])} file(s)"
    )
    bar = _bar(plan["bytes"], component, progress)
    try:
        for name, shard in zip(plan["files"], plan["shards"], strict=True):
            write_safetensors(directory / name, shard, seed, component, bar.update)
    finally:
        bar.close()
    if len(plan["files"]) > 1:
        metadata = {"total_size": plan["bytes"]}
        if library == "transformers":
            metadata = {"total_parameters": module.num_parameters(), **metadata}
        weight_map = {n: f for f, shard in zip(plan["files"], plan["shards"], strict=True) for n, _ in shard}
        index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
        index_path = directory / f"{plan['weights_name']}.index.json"
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return plan


def _tokenizer(kind: str):
    if kind == "qwen":  # Qwen2Tokenizer-compatible, built in code (the real one is a 151 k BPE we cannot fetch)
        from exporters.qwen_image.text import tiny_tokenizer

        return tiny_tokenizer()
    if kind == "llama":  # Llama-3-shaped, built in code (the real one is a 128 k BPE we cannot fetch)
        from exporters.hidream.text import tiny_llama_tokenizer

        return tiny_llama_tokenizer()
    from exporters.vocab import clip_tokenizer, t5_tokenizer

    if kind == "t5":
        return t5_tokenizer()
    return clip_tokenizer(pad_token="!") if kind == "clip-g" else clip_tokenizer()  # CLIP-G pads with "!"


def _scheduler_configs(cfg: dict) -> dict[str, dict]:
    """The pipeline's schedulers by component name: the config's own ``schedulers`` where it lists them (IF's
    stage II: its scheduler and image-noising scheduler, which the registry's stage I entry does not hold), else
    ``{"scheduler": _scheduler_config(cfg)}``."""
    if "schedulers" in cfg:
        return {name: dict(sched) for name, sched in cfg["schedulers"].items()}
    return {"scheduler": _scheduler_config(cfg)}


def _scheduler_config(cfg: dict) -> dict:
    """The registry model's scheduler config; while the registry has no entry for it, the config's own
    ``scheduler`` (the hub's ``scheduler_config.json``: qwen-image until the registry lists it)."""
    import registry

    try:
        return dict(registry.get(cfg["registry_model"]).scheduler)
    except KeyError:
        if "scheduler" not in cfg:
            raise
        return dict(cfg["scheduler"])


def _reclaim(folder: Path, progress) -> None:
    """Remove the temporary siblings ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` of killed builds of ``folder``."""
    pattern = re.compile(rf"^\.{re.escape(folder.name)}\.(tmp|old)-(\d+)-[^/]+$")
    for child in folder.parent.iterdir():
        match = pattern.match(child.name)
        if match and child.is_dir() and not process_alive(int(match.group(2))):
            progress(f"removing {child} (left by a killed build)")
            shutil.rmtree(child, ignore_errors=True)


def write_pipeline(
    family: str, folder: Path, *, seed: int = 0, shard_bytes: int = 2 * 2**30, progress=print, config_only=()
) -> Path:
    """Write the random pipeline of ``family`` (``flux-schnell``, ``sd3-medium@u1``...) as a diffusers folder
    that ``DiffusionPipeline.from_pretrained(folder)`` loads: ``model_index.json``, the registry model's
    scheduler (``_scheduler_config``), the tokenizers of ``random_model.build`` (qwen: ``_tokenizer``), and
    each model's ``config.json`` + bf16 safetensors (sharded at ``shard_bytes``, named and indexed as
    ``save_pretrained(safe_serialization=True)`` does), plus ``random_model.DONE``. The folder is built in a
    hidden sibling and renamed into place (replacing an earlier one) only when complete. Returns ``folder``.
    ``config_only``: components written without weights (their config alone; the folder then loads only with
    them left out, as ``bench.deepfloyd_if_parts`` exports IF-I-XL's UNet without its T5)."""
    import diffusers

    folder = Path(folder)
    cfg = random_model.config(family)
    kind = cfg["pipeline"]
    if kind not in PIPELINES:
        raise SystemExit(f"{family}: {kind} is not written here; random_model.build writes it ({', '.join(PIPELINES)})")
    spec = PIPELINES[kind]
    modules = {c: meta_module(c, cfg[c]) for c in spec["models"]}
    plans = {c: model_plan(m, lib, shard_bytes) for c, (m, lib) in modules.items() if c not in config_only}
    total = sum(p["bytes"] for p in plans.values())
    folder.parent.mkdir(parents=True, exist_ok=True)
    _reclaim(folder, progress)
    free = shutil.disk_usage(folder.parent).free
    if free < total + 2**27:
        raise SystemExit(f"{family}: needs {total / 2**30:.1f} GiB on {folder.parent}, {free / 2**30:.1f} GiB free")
    progress(f"writing random:{family} ({kind}, seed {seed}, {_size(total)} bf16) → {folder}")

    schedulers = {}
    for name, scheduler_cfg in _scheduler_configs(cfg).items():
        schedulers[name] = getattr(diffusers, scheduler_cfg.pop("_class_name")).from_config(scheduler_cfg)
    tokenizers = {name: _tokenizer(tok) for name, tok in spec["tokenizers"].items()}
    # the pipeline object (meta models) only for its model_index.json: what save_pretrained writes first
    models = {c: m for c, (m, _) in modules.items()}
    pipe = getattr(diffusers, kind)(**schedulers, **tokenizers, **models, **spec.get("extra", {}))

    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-{os.getpid()}-", dir=folder.parent))
    try:
        pipe.save_config(tmp)
        for name, scheduler in schedulers.items():
            scheduler.save_pretrained(tmp / name)
        for name, tokenizer in tokenizers.items():
            tokenizer.save_pretrained(tmp / name)
        for component, (module, library) in modules.items():
            if component in config_only:
                saver = module.save_config if library == "diffusers" else module.config.save_pretrained
                saver(tmp / component)
                continue
            write_model(
                module, library, tmp / component, component, seed=seed, shard_bytes=shard_bytes, progress=progress
            )
        marker = {"model": f"random:{family}", "seed": seed, "dtype": "bfloat16", "writer": "bench.random_weights"}
        marker.update({"config_only": list(config_only)} if config_only else {})
        (tmp / random_model.DONE).write_text(json.dumps(marker) + "\n")
        replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.monotonic() - started
    rate = total / 2**20 / max(seconds, 1e-9)
    progress(f"wrote {folder}: {_size(total)} in {seconds:.0f} s ({rate:.0f} MiB/s)")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.random_weights",
        description="Write a full-size random-weight diffusers pipeline as bf16 safetensors shards, tensor by tensor.",
    )
    parser.add_argument("family", help=f"one of {', '.join(random_model.families())}, or <family>@u<N>")
    parser.add_argument("--out", type=Path, required=True, help="the pipeline folder to write (replaced if there)")
    parser.add_argument("--seed", type=int, default=random_model.SEED)
    parser.add_argument("--shard-gib", type=float, default=2.0, help="largest safetensors file, GiB (default 2)")
    parser.add_argument("--config-only", nargs="+", default=(), help="components written without weights")
    args = parser.parse_args(argv)
    shard_bytes = int(args.shard_gib * 2**30)
    write_pipeline(args.family, args.out, seed=args.seed, shard_bytes=shard_bytes, config_only=tuple(args.config_only))


if __name__ == "__main__":
    main()
