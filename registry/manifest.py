"""The ``stepwise.json`` manifest: the one format exporters write and the engine reads (docs/design.md)."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from .home import MANIFEST

FORMAT = 1


class ManifestError(ValueError):
    """A folder that is not a complete, validated Stepwise export."""


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write(folder: Path, manifest: dict) -> Path:
    """Atomically: a temporary file beside it, renamed over it (a reader sees the old manifest or the new)."""
    path = Path(folder) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "x") as f:
            f.write(json.dumps({"format": FORMAT, **manifest}, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@dataclass
class Manifest:
    folder: Path
    data: dict

    @property
    def family(self) -> str:
        return self.data["family"]

    @property
    def model_id(self) -> str | None:
        return self.data.get("model_id")

    @property
    def config(self) -> dict:
        return self.data.get("config", {})

    @property
    def components(self) -> dict:
        return self.data.get("components", {})

    def component_path(self, name: str) -> Path:
        return self.folder / self.components[name]["path"]

    def weights_bytes(self, names=None) -> int:
        names = self.components if names is None else names
        total = 0
        for name in names:
            entry = self.components[name]
            total += entry.get("bytes", 0) + entry.get("data_bytes", 0)
        return total


def read(folder: str | Path, *, check_files: bool = True) -> Manifest:
    """Read and sanity-check an export; every problem is a ManifestError with a one-line fix."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ManifestError(f"{folder} is not a folder; export a model first with `stepwise export`")
    if not path.is_file():
        if (folder / "model_index.json").is_file():  # optimum's export: the manifest is derived (registry/derive.py)
            from . import derive

            return Manifest(folder, derive.load(folder))
        raise ManifestError(
            f"{folder} has no {MANIFEST}: it is not a complete Stepwise export; "
            f"run `stepwise export SOURCE --out {folder}` again"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}); export the model again") from None
    _validate(data, path)
    manifest = Manifest(folder, data)
    if check_files and data.get("derived"):
        from . import derive

        if derive.stale(manifest):  # the graphs were replaced since the manifest was derived: derive it again
            return Manifest(folder, derive.load(folder))
    if check_files:
        for name, entry in manifest.components.items():
            _check_file(folder / entry["path"], entry.get("bytes"), name)
            if entry.get("data_path"):  # weights over 2 GB live beside the graph
                _check_file(folder / entry["data_path"], entry.get("data_bytes"), name)
    return manifest


def _validate(data, path: Path) -> None:
    """Field by field, so a damaged or hand-edited manifest is a one-line error, not a KeyError later."""
    from .models import families

    again = "export the model again"
    if not isinstance(data, dict):
        raise ManifestError(f"{path} holds a {type(data).__name__}, not a manifest object; {again}")
    if data.get("format") != FORMAT:
        raise ManifestError(f"{path} has format {data.get('format')!r}, expected {FORMAT}; {again}")
    family = data.get("family")
    if not isinstance(family, str) or not family:
        raise ManifestError(f"{path} names no model family; {again}")
    if family not in families():
        known = ", ".join(families())
        raise ManifestError(f"{path} has family {family!r}, which Stepwise does not know ({known}); {again}")
    components = data.get("components")
    if not isinstance(components, dict) or not components:
        raise ManifestError(f"{path} lists no components; {again}")
    for name, entry in components.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise ManifestError(f"{path}: component {name!r} has no graph path; {again}")
        for field in ("bytes", "data_bytes"):
            if entry.get(field) is not None and not isinstance(entry[field], int):
                raise ManifestError(f"{path}: component {name!r} has a non-integer {field}; {again}")
        if Path(entry["path"]).is_absolute() or ".." in Path(entry["path"]).parts:
            raise ManifestError(f"{path}: component {name!r} points outside the export; {again}")
    if not isinstance(data.get("config", {}), dict):
        raise ManifestError(f"{path}: config is not an object; {again}")


def is_derived(folder: Path) -> bool:
    """A folder whose manifest was derived from a foreign export (registry/derive.py), not written by an export."""
    try:
        return bool(json.loads((Path(folder) / MANIFEST).read_text()).get("derived"))
    except (OSError, ValueError, AttributeError):
        return False


def _check_file(file: Path, expected_bytes: int | None, name: str) -> None:
    if not file.is_file():
        raise ManifestError(f"{file} is missing ({name}); export the model again")
    size = file.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        raise ManifestError(
            f"{file} is {size} bytes, the manifest says {expected_bytes}: the file is corrupted "
            f"or was replaced; export the model again"
        )
