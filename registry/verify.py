"""Integrity: every graph and weight file of an export against the sha256 its manifest recorded.

Checked on first load and again whenever a file's size or mtime changes; what was verified is cached in
``<export>/.verified.json`` (size, mtime and hash per file), so later loads cost a stat per file. A folder
that cannot be written is verified every time (correct, only slower). ``stepwise verify MODEL`` checks all
again regardless of the cache.
"""

from __future__ import annotations

import json
from pathlib import Path

from .files import atomic_write_text
from .manifest import Manifest, ManifestError, sha256_of

VERIFIED = ".verified.json"


def recorded_files(manifest: Manifest) -> list[tuple[str, str | None]]:
    """(path relative to the export, recorded sha256) of every graph and external-weights file."""
    files = []
    for entry in manifest.components.values():
        files.append((entry["path"], entry.get("sha256")))
        if entry.get("data_path"):
            files.append((entry["data_path"], entry.get("data_sha256")))
    return files


def _load_cache(folder: Path) -> dict:
    try:
        cache = json.loads((folder / VERIFIED).read_text())
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        return {}


def verify(manifest: Manifest, *, force: bool = False, progress=None) -> list[str]:
    """Raise ManifestError (one line) for a file whose content is not what was exported; return the files
    that were hashed this time (empty when the cache vouched for all of them)."""
    folder = manifest.folder
    cache = {} if force else _load_cache(folder)
    hashed = []
    seen = set()  # files hashed this time, by inode: a step-cache graph's weights are a hard link to the whole's
    for rel, expected in recorded_files(manifest):
        if not expected:
            continue  # an export from before hashes were recorded: the size check is all there is
        file = folder / rel
        st = file.stat()
        stamp = [st.st_size, st.st_mtime_ns, expected]
        if cache.get(rel) == stamp:
            continue
        if (st.st_dev, st.st_ino, *stamp) in seen:  # the same file, found to hold ``expected`` just now
            cache[rel] = stamp
            continue
        if progress:
            progress(f"verifying {rel} ({st.st_size / 2**20:,.0f} MB)")
        if sha256_of(file) != expected:
            raise ManifestError(
                f"{file} does not match the sha256 its export recorded: the file is corrupted or was replaced; "
                f"export the model again"
            )
        cache[rel] = stamp
        seen.add((st.st_dev, st.st_ino, *stamp))
        hashed.append(rel)
    if hashed:
        try:
            atomic_write_text(folder / VERIFIED, json.dumps(cache, indent=1) + "\n")
        except OSError:
            pass  # a read-only export is verified again next time
    return hashed
