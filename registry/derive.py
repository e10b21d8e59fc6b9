"""A manifest for an ONNX folder Stepwise did not export: optimum's text-to-image layout, as written by
``optimum-cli export onnx --task text-to-image`` or an ``ORTStableDiffusion*Pipeline.save_pretrained``.

The fields the engine reads are derived from ``model_index.json`` (the pipeline class → family), the
components' ``config.json``, ``scheduler/scheduler_config.json``, the tokenizer folders and the graphs'
interfaces (registry/onnx_graph.py reads them from the protobuf without loading weights). They are checked
against what the engine feeds each graph and reads from it; then the manifest is written beside the graphs
as ``stepwise.json`` (atomically), marked ``"source": "optimum"`` and ``"derived": true``, and later loads
read it as they read any export. A folder that cannot be written keeps its derived manifest in this
process's memory (logged at debug level only).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path

from . import onnx_graph
from .home import MANIFEST
from .manifest import FORMAT, ManifestError, sha256_of, write
from .pipelines import DEFAULT_SAMPLE_SIZE, PIPELINE_FAMILIES, T5_SEQUENCE_LENGTH

log = logging.getLogger(__name__)

INDEX = "model_index.json"
SOURCE = "optimum"
GRAPH = "model.onnx"
COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae_decoder", "vae_encoder")
REEXPORT = "re-export it (optimum-cli export onnx --task text-to-image, or stepwise export)"

# What the engine feeds each graph and reads from it (docs/design.md's names); family extras below.
GRAPH_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "text_encoder": (("input_ids",), ("last_hidden_state",)),
    "unet": (("sample", "timestep", "encoder_hidden_states"), ("out_sample",)),
    "transformer": (
        ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections"),
        ("out_hidden_states",),
    ),
    "vae_decoder": (("latent_sample",), ("sample",)),
    "vae_encoder": (("sample",), ("latent_parameters",)),
}
# Per family: the components it cannot run without, and what it conditions on from each text encoder:
# "penultimate" = hidden_states.N (the second-to-last layer's states), "text_embeds" = the projected pooled
# output (CLIPTextModelWithProjection), "pooled" = pooler_output or text_embeds.
FAMILIES: dict[str, dict] = {
    "sd15": {"required": ("text_encoder", "unet", "vae_decoder"), "text": {"text_encoder": ()}},
    "sdxl": {
        "required": ("text_encoder", "text_encoder_2", "unet", "vae_decoder"),
        "text": {"text_encoder": ("penultimate",), "text_encoder_2": ("penultimate", "text_embeds")},
    },
    "sd3": {
        "required": ("text_encoder", "text_encoder_2", "transformer", "vae_decoder"),
        "text": {
            "text_encoder": ("penultimate", "text_embeds"),
            "text_encoder_2": ("penultimate", "text_embeds"),
            "text_encoder_3": (),
        },
    },
    "flux": {
        "required": ("text_encoder", "text_encoder_2", "transformer", "vae_decoder"),
        "text": {"text_encoder": ("pooled",), "text_encoder_2": ()},
    },
}
WHY = {
    "penultimate": "the penultimate layer's states (hidden_states.N)",
    "text_embeds": "the projected pooled embedding (text_embeds)",
    "pooled": "a pooled embedding (pooler_output or text_embeds)",
}

# folder → (its files' state, derived manifest): what a read-only folder is read from after the first time
_MEMORY: dict[Path, tuple[tuple, dict]] = {}


def load(folder: Path) -> dict:
    """The folder's derived manifest: from memory when nothing changed, else derived, checked and written."""
    folder = Path(folder)
    key = folder.resolve()
    state = _state(folder)
    known = _MEMORY.get(key)
    if known is not None and known[0] == state:
        return known[1]
    data = {"format": FORMAT, **derive(folder)}
    try:
        write(folder, data)
    except OSError as exc:  # a read-only folder: the manifest lives in memory for this process
        log.debug("derived manifest of %s kept in memory: %s", folder, exc)
    _MEMORY[key] = (state, data)
    return data


def stale(manifest) -> bool:
    """A derived manifest whose graphs are no longer the files it lists (sizes; a re-export in place)."""
    for entry in manifest.components.values():
        for path, size in ((entry["path"], entry.get("bytes")), (entry.get("data_path"), entry.get("data_bytes"))):
            if path and not ((manifest.folder / path).is_file() and (manifest.folder / path).stat().st_size == size):
                return True
    return False


def _state(folder: Path) -> tuple:
    """The names, sizes and mtimes of the folder's files (two levels, hidden ones and the manifest excluded)."""
    found = []
    for path in sorted(folder.glob("*")) + sorted(folder.glob("*/*")):
        if path.name.startswith(".") or path.name == MANIFEST or not path.is_file():
            continue
        st = path.stat()
        found.append((str(path.relative_to(folder)), st.st_size, st.st_mtime_ns))
    return tuple(found)


# --- the derivation ----------------------------------------------------------------------------------


def derive(folder: Path) -> dict:
    """The manifest fields of the folder (without ``format``); ManifestError names what is missing and the fix."""
    folder = Path(folder)
    index = _json(folder / INDEX, "the pipeline's index")
    cls = index.get("_class_name")
    family = PIPELINE_FAMILIES.get(cls or "")
    if family not in FAMILIES:  # unknown, or a family Stepwise runs only from its own exports (IF's cascade, ...)
        known = ", ".join(c for c, f in PIPELINE_FAMILIES.items() if f in FAMILIES)
        raise ManifestError(
            f"{folder} holds a {cls or 'pipeline without _class_name'} ({INDEX}), which Stepwise "
            f"cannot run; bring an export of one of {known}"
        )
    present = [name for name in COMPONENTS if (folder / name / GRAPH).is_file()]
    if not present:
        raise ManifestError(
            f"{folder} has a {INDEX} but no ONNX graphs (unet/{GRAPH}, ...): it is a diffusers checkpoint, not an "
            f"export; export it with `stepwise export {folder}`"
        )
    rules = FAMILIES[family]
    missing = [name for name in rules["required"] if name not in present]
    if missing:
        raise ManifestError(
            f"{folder} has no {', '.join(f'{n}/{GRAPH}' for n in missing)}, which a {cls} needs; {REEXPORT}"
        )
    denoiser = "unet" if "unet" in rules["required"] else "transformer"
    configs = {name: _json(folder / name / "config.json", f"{name}'s config") for name in present}
    dcfg = configs[denoiser]
    graphs = {}
    for name in present:
        try:
            graphs[name] = onnx_graph.read_interface(folder / name / GRAPH)
        except onnx_graph.OnnxFormatError as exc:
            raise ManifestError(f"{exc}; {REEXPORT}") from None
    text = [n for n in present if n.startswith("text_encoder") and n in rules["text"]]
    for name in text:
        _check_io(folder, name, graphs[name], *GRAPH_IO["text_encoder"])
        for need in rules["text"][name]:
            _check_text_output(folder, name, graphs[name], need, cls)
        _check_tokenizer(folder, name.replace("text_encoder", "tokenizer"))
    extra_inputs = []
    if denoiser == "unet":
        if dcfg.get("addition_embed_type") == "text_time":
            extra_inputs += ["text_embeds", "time_ids"]
        if dcfg.get("time_cond_proj_dim") is not None:
            extra_inputs.append("timestep_cond")
    elif family == "flux":
        extra_inputs += ["img_ids", "txt_ids"] + (["guidance"] if dcfg.get("guidance_embeds") else [])
    inputs, outputs = GRAPH_IO[denoiser]
    _check_io(folder, denoiser, graphs[denoiser], (*inputs, *extra_inputs), outputs)
    for name in ("vae_decoder", "vae_encoder"):
        if name in graphs:
            _check_io(folder, name, graphs[name], *GRAPH_IO[name])
    timestep = graphs[denoiser].input("timestep")
    if timestep.shape is None or len(timestep.shape) > 1:
        raise ManifestError(
            f"{folder / denoiser / GRAPH} takes timestep of shape {timestep.shape}; the engine feeds a scalar or one "
            f"per sample: {REEXPORT}"
        )
    scheduler = _json(folder / "scheduler" / "scheduler_config.json", "the scheduler's config")

    components = {}
    for name in [n for n in present if n in text or n in (denoiser, "vae_decoder", "vae_encoder")]:
        graph, path = graphs[name], folder / name / GRAPH
        entry = {
            "path": f"{name}/{GRAPH}",
            "bytes": path.stat().st_size,
            "sha256": sha256_of(path),
            "inputs": {v.name: _describe(v) for v in graph.inputs},
            "outputs": {v.name: _describe(v) for v in graph.outputs},
            "producer": graph.producer,
        }
        if len(graph.external_data) > 1:
            raise ManifestError(
                f"{path} keeps its weights in {len(graph.external_data)} files; save them in one "
                f"(onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True))"
            )
        for location in graph.external_data:
            data = path.parent / location
            if not data.is_file():
                raise ManifestError(
                    f"{data} is missing (the weights of {path}); copy it beside the graph or {REEXPORT}"
                )
            entry.update(data_path=f"{name}/{location}", data_bytes=data.stat().st_size, data_sha256=sha256_of(data))
        components[name] = entry

    config = _config(index, family, denoiser, configs, scheduler, folder, text, graphs)
    return {
        "model_id": None,
        "family": family,
        "source": SOURCE,
        "derived": True,
        "random_weights": None,
        "scheduler_source": "checkpoint",
        "opset": graphs[denoiser].opset,
        "precision": _precision(graphs[denoiser].input(inputs[0])),
        "vae_precision": _precision(graphs["vae_decoder"].input("latent_sample")),
        "exporter": SOURCE,
        "components": components,
        "config": config,
        "versions": {k: v for k, v in (("diffusers", index.get("_diffusers_version")),) if v},
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _config(index, family, denoiser, configs, scheduler, folder, text, graphs) -> dict:
    """The manifest's ``config``: the keys exporters/main.py's pipeline_config writes, from the JSON files."""
    dcfg, vcfg = configs[denoiser], configs["vae_decoder"]
    cls = index["_class_name"]
    vae_scale_factor = 2 ** (len(vcfg.get("block_out_channels") or [0] * 4) - 1)
    default_sample = DEFAULT_SAMPLE_SIZE.get(cls) or dcfg.get("sample_size")
    guidance_embeds = bool(dcfg.get("guidance_embeds", False))
    t5 = [n for n in text if _index_class(index, n) == "T5EncoderModel"]
    seq_key = "flux-guidance" if family == "flux" and guidance_embeds else family
    shift = vcfg.get("shift_factor")
    tokenizers = {}
    for name in text:
        tok = name.replace("text_encoder", "tokenizer")
        length = _json_optional(folder / tok / "tokenizer_config.json").get("model_max_length")
        tokenizers[tok] = int(length) if isinstance(length, (int, float)) and length < 1_000_000 else None
    timestep_rank = len(graphs[denoiser].input("timestep").shape)
    return {
        "pipeline_class": cls,
        "denoiser": denoiser,
        "vae_scaling_factor": float(vcfg.get("scaling_factor", 0.18215)),
        "vae_shift_factor": float(shift) if shift is not None else None,
        "vae_scale_factor": vae_scale_factor,
        "latent_channels": int(vcfg.get("latent_channels", 4)),
        "in_channels": int(dcfg["in_channels"]),
        "sample_size": int(dcfg["sample_size"]) if dcfg.get("sample_size") else None,
        "default_image_size": int(default_sample) * vae_scale_factor if default_sample else None,
        "text_encoder_layers": {n: _first(configs[n], "num_hidden_layers", "num_layers") for n in text},
        "text_encoder_hidden_size": {n: _first(configs[n], "hidden_size", "d_model") for n in text},
        "text_encoder_projection_dim": {
            n: int(configs[n]["projection_dim"])
            for n in text
            if _index_class(index, n).endswith("Projection") and configs[n].get("projection_dim")
        },
        "tokenizer_max_length": tokenizers,
        # SD 3 without its T5 still fills T5's window with zeros, so its length is recorded either way
        "max_sequence_length": T5_SEQUENCE_LENGTH.get(seq_key) if t5 or family == "sd3" else None,
        "time_cond_proj_dim": dcfg.get("time_cond_proj_dim"),
        "requires_aesthetics_score": bool(index.get("requires_aesthetics_score", False)),
        "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", False)),
        "addition_embed_type": dcfg.get("addition_embed_type"),
        "addition_time_embed_dim": dcfg.get("addition_time_embed_dim"),
        "cross_attention_dim": dcfg.get("cross_attention_dim"),
        "patch_size": dcfg.get("patch_size") if denoiser == "transformer" else None,
        "guidance_embeds": guidance_embeds,
        "joint_attention_dim": dcfg.get("joint_attention_dim"),
        "pooled_projection_dim": dcfg.get("pooled_projection_dim"),
        "axes_dims_rope": list(dcfg["axes_dims_rope"]) if dcfg.get("axes_dims_rope") else None,
        # as the graph takes it (optimum: a scalar for UNets, one per sample for transformers); FLUX's
        # transformer takes t / 1000, as FluxPipeline feeds it
        "timestep_shape": "scalar" if timestep_rank == 0 else "batch",
        "timestep_scale": 0.001 if family == "flux" else 1.0,
        "scheduler_class": scheduler.get("_class_name"),
        "prediction_type": scheduler.get("prediction_type"),
        # what the memory estimate and tiled VAE read (exporters/main.py records the same from the modules)
        "vae_sample_size": _scalar(vcfg.get("sample_size")),
        "vae_block_out_channels": [int(c) for c in vcfg.get("block_out_channels") or []],
        "vae_mid_block_attention": bool(vcfg.get("mid_block_add_attention", True)),
        "denoiser_attention": _attention_layout(denoiser, dcfg, family, T5_SEQUENCE_LENGTH.get(seq_key, 0), tokenizers),
    }


def _scalar(value) -> int | None:
    if value is None:
        return None
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _attention_layout(denoiser: str, dcfg: dict, family: str, t5_tokens: int, tokenizers: dict) -> dict:
    """exporters/main.py's ``_attention_layout`` from the config alone: the denoiser's largest self-attention."""
    if denoiser == "unet":
        stride = heads = None
        for level, block in enumerate(dcfg.get("down_block_types") or []):
            if "Attn" in block:  # the first block with attention has the most tokens
                # diffusers' UNet: num_attention_heads, else (its historical name) attention_head_dim, per level
                per_level = dcfg.get("num_attention_heads") or dcfg.get("attention_head_dim")
                stride, heads = 2**level, _level(per_level, level)
                break
        return {"stride": stride, "heads": heads, "joint_tokens": 0, "width": int(dcfg["block_out_channels"][0])}
    heads = int(dcfg["num_attention_heads"])
    text = t5_tokens + ((tokenizers.get("tokenizer") or 77) if family == "sd3" else 0)
    stride = int(dcfg.get("patch_size") or 1) * (2 if family == "flux" else 1)
    return {"stride": stride, "heads": heads, "joint_tokens": text, "width": heads * int(dcfg["attention_head_dim"])}


def _level(value, level: int) -> int | None:
    if value is None:
        return None
    return int(value[level] if isinstance(value, (list, tuple)) else value)


# --- checks ------------------------------------------------------------------------------------------


def _check_io(folder, name, graph, inputs, outputs) -> None:
    lacking_in = [n for n in inputs if n not in graph.input_names]
    lacking_out = [n for n in outputs if n not in graph.output_names]
    if lacking_in or lacking_out:
        what = "; ".join(
            f"{kind} {', '.join(names)}"
            for kind, names in (("no input", lacking_in), ("no output", lacking_out))
            if names
        )
        raise ManifestError(
            f"{folder / name / GRAPH} has {what} (it has inputs {', '.join(graph.input_names)}; outputs "
            f"{', '.join(graph.output_names[:6])}{', ...' if len(graph.output_names) > 6 else ''}), which the engine "
            f"feeds and reads by optimum's names; {REEXPORT}"
        )


def _check_text_output(folder, name, graph, need, cls) -> None:
    outputs = set(graph.output_names)
    layers = [o for o in outputs if o.startswith("hidden_states.") and o.partition(".")[2].isdigit()]
    if need == "penultimate":
        ok = len(layers) >= 2
    elif need == "text_embeds":
        ok = "text_embeds" in outputs
    else:
        ok = bool(outputs & {"pooler_output", "text_embeds"})
    if not ok:
        raise ManifestError(
            f"{folder / name / GRAPH} does not output {WHY[need]}, which a {cls} conditions on; {REEXPORT} "
            f"(optimum's exporter adds hidden_states.N for SDXL and SD 3 text encoders)"
        )


def _check_tokenizer(folder: Path, name: str) -> None:
    """tokenizer.json (what the engine reads), or CLIP's vocab.json + merges.txt (the engine converts them)."""
    tok = folder / name
    if (tok / "tokenizer.json").is_file():
        return
    config = _json_optional(tok / "tokenizer_config.json")
    cls = str(config.get("tokenizer_class") or "")
    if cls.startswith("CLIPTokenizer") and (tok / "vocab.json").is_file() and (tok / "merges.txt").is_file():
        return
    have = ", ".join(sorted(p.name for p in tok.iterdir())) if tok.is_dir() else "nothing"
    raise ManifestError(
        f"{tok} has no tokenizer.json, which the engine reads (it has {have}; only CLIP's vocab.json + merges.txt "
        f'are converted without transformers); save the fast tokenizer there: python -c "from transformers import '
        f"AutoTokenizer as T; T.from_pretrained('{tok}').save_pretrained('{tok}')\""
    )


# --- small helpers -----------------------------------------------------------------------------------


def _json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ManifestError(f"{path} is missing ({what}); copy it from the diffusers checkpoint or {REEXPORT}")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}); copy it from the diffusers checkpoint") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path} is not a JSON object; copy it from the diffusers checkpoint")
    return data


def _json_optional(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _index_class(index: dict, name: str) -> str:
    entry = index.get(name)
    return str(entry[1]) if isinstance(entry, list) and len(entry) == 2 and entry[1] else ""


def _first(config: dict, *keys) -> int | None:
    return next((int(config[k]) for k in keys if config.get(k) is not None), None)


def _describe(value: onnx_graph.Value) -> dict:
    dtype = value.type[len("tensor(") : -1] if value.type.startswith("tensor(") else value.type
    return {"dtype": dtype, "shape": [d if d is not None else "?" for d in value.shape or []]}


def _precision(value) -> str:
    return {"tensor(float16)": "fp16", "tensor(bfloat16)": "bf16"}.get(value.type if value else "", "fp32")
