"""SOURCE → a loaded diffusers pipeline: ``tiny:<family>``, a local pipeline folder, or a hub repo id.

Resolution (``resolve``) is cheap and happens before anything heavy: it reads ``model_index.json``
(downloading only that file for a hub repo) so a wrong family or a missing pipeline is reported before
gigabytes are fetched. Hub access goes through ``huggingface_hub`` and honours its cache, ``HF_TOKEN``
and ``HF_HUB_OFFLINE`` (read when the export runs, not when the library was imported).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ExportError
from .families import LATER_STAGES, NEEDED_FOLDERS, PIPELINE_FAMILIES, TINY_SOURCES, UNNEEDED_COMPONENTS, family_of

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# The weight files diffusers loads by default (no variant): model.safetensors, sharded ones and their index.
WEIGHTS = re.compile(r"^(diffusion_pytorch_model|pytorch_model|model)(-\d{5}-of-\d{5})?\.(safetensors|bin)$")
WEIGHTS_INDEX = re.compile(r"^(diffusion_pytorch_model|pytorch_model|model)\.(safetensors|bin)\.index\.json$")
SMALL_FILES = re.compile(r"^[^.]+(\.[^.]+)?\.(json|txt|model)$")  # configs, vocabularies, spiece.model


@dataclass
class Source:
    spec: str  # as the caller wrote it
    kind: str  # "tiny", "folder" or "hub"
    name: str  # default export folder name
    family: str
    pipeline_class: str
    tiny: str | None = None
    folder: Path | None = None  # the pipeline folder (a hub repo's once downloaded)
    repo: str | None = None

    @property
    def random_weights(self) -> bool:
        return self.kind == "tiny"


def _supported() -> str:
    """The pipeline classes by family, without their common "Pipeline" suffix: the list outgrew one line. A
    cascade's later stages are exported with its first (--stage-2), not as a SOURCE."""
    by_family: dict[str, list[str]] = {}
    for cls, fam in PIPELINE_FAMILIES.items():
        if cls not in LATER_STAGES:
            by_family.setdefault(fam, []).append(cls.removesuffix("Pipeline"))
    return "; ".join(f"{fam}: {', '.join(classes)}" for fam, classes in by_family.items()) + " (…Pipeline)"


def _family_from_index(index: dict, where: str) -> tuple[str, str]:
    cls = index.get("_class_name")
    family = family_of(cls)
    if family is None:
        raise ExportError(f"{where} is a {cls or 'unknown'} pipeline, not one Stepwise exports: {_supported()}")
    return family, cls


def _read_index(path: Path, where: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path} is not readable JSON ({exc}); pass an intact diffusers pipeline folder") from None


# --- hub access ------------------------------------------------------------------------------------


def hub_offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> str | None:
    """The hub cache as the environment says now (HF_HUB_CACHE, else HF_HOME/hub, else the default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def _cache_label() -> str:
    from huggingface_hub import constants

    return hub_cache_dir() or constants.HF_HUB_CACHE


def hub_error(exc: Exception, repo: str, what: str) -> ExportError:
    """One line for whatever huggingface_hub raised."""
    from huggingface_hub import errors

    name = type(exc).__name__
    if isinstance(exc, errors.GatedRepoError):
        return ExportError(
            f"{repo} is gated: accept its licence at https://huggingface.co/{repo} and set HF_TOKEN to a token "
            f"of that account, then export again"
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        return ExportError(
            f"{repo} was not found on the Hugging Face Hub (or is private); check the repo id, "
            f"or set HF_TOKEN if it is private"
        )
    local = isinstance(exc, errors.LocalEntryNotFoundError)
    if isinstance(exc, errors.EntryNotFoundError) and not local:
        return ExportError(f"{repo} has no {what}; is it a diffusers pipeline repo?")
    if local or (isinstance(exc, (OSError, ConnectionError)) and not isinstance(exc, errors.HfHubHTTPError)):
        if hub_offline():
            return ExportError(
                f"{what} of {repo} is not in the Hugging Face cache ({_cache_label()}) and HF_HUB_OFFLINE is set, so "
                f"it cannot be downloaded; unset HF_HUB_OFFLINE, or export from a local pipeline folder"
            )
        return ExportError(
            f"cannot download {what} of {repo} and it is not in the Hugging Face cache ({_cache_label()}): "
            f"{name}; check the network (or HF_ENDPOINT), or export from a local pipeline folder"
        )
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else name
    return ExportError(f"downloading {what} of {repo} failed: {first[:200]}; try again, or export from a local folder")


def hub_file(repo: str, filename: str, what: str | None = None) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, cache_dir=hub_cache_dir(), local_files_only=hub_offline()))
    except Exception as exc:
        raise hub_error(exc, repo, what or filename) from None


def select_files(files: list[str], index: dict) -> list[str]:
    """The files of a repo to fetch: model_index, each needed folder's configs/vocabularies and default
    weights (safetensors, else .bin; no fp16/non-EMA variants, no single-file checkpoints)."""
    folders = {name for name in index if not name.startswith("_")} & set(NEEDED_FOLDERS)
    wanted = ["model_index.json"]
    weights: dict[str, list[str]] = {}
    for path in files:
        folder, _, base = path.partition("/")
        if folder not in folders or "/" in base:
            continue
        if WEIGHTS.match(base) or WEIGHTS_INDEX.match(base):
            weights.setdefault(folder, []).append(path)
        elif SMALL_FILES.match(base):
            wanted.append(path)
    for paths in weights.values():
        safetensors = [p for p in paths if ".safetensors" in p]
        wanted += safetensors or paths
    return wanted


def hub_snapshot(repo: str, index: dict) -> Path:
    """Download (or find in the cache) what the export needs of a hub repo; the snapshot folder."""
    from huggingface_hub import HfApi, snapshot_download

    offline = hub_offline()
    patterns = None
    if not offline:
        try:
            patterns = select_files(HfApi().list_repo_files(repo), index)
        except Exception as exc:
            if not _cached(repo):
                raise hub_error(exc, repo, "the file list") from None
            offline = True  # the Hub is unreachable but the repo is cached: use the cache
    try:
        folder = snapshot_download(repo, allow_patterns=patterns, cache_dir=hub_cache_dir(), local_files_only=offline)
    except Exception as exc:
        raise hub_error(exc, repo, "the pipeline files") from None
    return Path(folder)


def _cached(repo: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, "model_index.json", cache_dir=hub_cache_dir())
    return isinstance(found, str)


# --- resolve and load ------------------------------------------------------------------------------


def resolve(spec: str) -> Source:
    """Which kind of source this is, its family and pipeline class; raises ExportError."""
    spec = str(spec).strip()
    if spec.startswith("tiny:"):
        name = spec[len("tiny:") :]
        if name not in TINY_SOURCES:
            known = ", ".join(f"tiny:{n}" for n in TINY_SOURCES)
            raise ExportError(f"unknown tiny family {spec!r}; use one of {known}")
        family, _, cls = TINY_SOURCES[name]
        return Source(spec, "tiny", f"tiny-{name}", family, cls, tiny=name)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "model_index.json").is_file():
            raise ExportError(
                f"{spec} is not a diffusers pipeline folder (it has no model_index.json); pass the folder "
                f"that holds model_index.json, a hub repo id (org/name) or tiny:<family>"
            )
        index = _read_index(path / "model_index.json", spec)
        family, cls = _family_from_index(index, spec)
        return Source(spec, "folder", path.resolve().name, family, cls, folder=path.resolve())
    if HUB_ID.match(spec):
        index = _read_index(hub_file(spec, "model_index.json", "model_index.json"), spec)
        family, cls = _family_from_index(index, spec)
        return Source(spec, "hub", spec.split("/")[-1].lower(), family, cls, repo=spec)
    if spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") != 1:
        raise ExportError(f"{spec} does not exist; pass a diffusers pipeline folder, a hub repo id or tiny:<family>")
    raise ExportError(
        f"{spec!r} is neither a folder, a hub repo id (org/name) nor tiny:<family>; "
        f"pass one of those (tiny families: {', '.join(TINY_SOURCES)})"
    )


def load(source: Source, *, streamed: bool = False):
    """The fp32 diffusers pipeline of a resolved source (downloads a hub repo's needed files first); with
    ``streamed``, its denoiser and text encoders are built on the meta device, their weights left on disk."""
    if source.kind == "tiny":
        from . import tiny

        return tiny.build(source.tiny)
    fetch(source)
    return load_folder(source.folder, source.spec, streamed=streamed)


def fetch(source: Source) -> None:
    """Download a hub repo's needed files (once) and point ``source.folder`` at the snapshot."""
    if source.kind == "hub" and source.folder is None:
        index = _read_index(hub_file(source.repo, "model_index.json"), source.spec)
        source.folder = hub_snapshot(source.repo, index)


def has_meta(pipeline) -> bool:
    """Whether some component was left unloaded (on the meta device) for the streaming exporter."""
    from .streaming import on_meta

    return any(hasattr(m, "parameters") and on_meta(m) for m in pipeline.components.values() if m is not None)


def _unloaded(folder: Path, index: dict) -> dict:
    """The components exporters.streaming writes tensor by tensor, built on the meta device from their config
    alone: the pipeline never holds their weights."""
    import importlib

    from .streaming import STREAMED_CLASSES, build

    modules = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[1] not in STREAMED_CLASSES:
            continue
        library, cls_name = entry
        cls = getattr(importlib.import_module(library), cls_name)
        if library == "diffusers":
            config = cls.load_config(str(folder / name))
        else:
            config = cls.config_class.from_pretrained(str(folder / name))
        modules[name], _ = build(cls, config, meta_buffers=False)
    return modules


def load_folder(folder: Path, label: str | None = None, *, streamed: bool = False, exclude: tuple[str, ...] = ()):
    """``exclude``: components left unloaded (None), e.g. IF stage II's text encoder, which stage I's serves."""
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    label = label or str(folder)
    index = _read_index(folder / "model_index.json", label)
    skip = {name: None for name in (*UNNEEDED_COMPONENTS, *exclude) if name in index}
    bars = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()  # "Loading pipeline components" is not one of our stages
    try:
        if streamed:
            skip.update({k: v for k, v in _unloaded(folder, index).items() if k not in skip})
        pipeline = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32, **skip)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"diffusers cannot load the pipeline in {label} ({type(exc).__name__}: {first}); "
            f"check the folder is a complete diffusers pipeline (for a hub repo: download it again online)"
        ) from None
    finally:
        if bars:
            diffusers_logging.enable_progress_bar()
    pipeline.set_progress_bar_config(disable=True)
    for module in pipeline.components.values():
        if hasattr(module, "eval"):
            module.eval()
    return pipeline
