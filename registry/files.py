"""Output files that are checked before any work and replaced atomically, so nothing is computed in vain and
nothing already there is lost: a kill or a full disk mid-write leaves the old file as it was."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


class OutputError(ValueError):
    """An output path that cannot be written; the message names the path and the fix."""


def check_output(path, *, option: str, suffixes: tuple[str, ...], need_bytes: int = 0) -> Path:
    """Fail now, before loading anything, if ``path`` cannot receive the output."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path} is a folder; give a file name such as {path / ('out' + suffixes[0])}")
    if suffixes and path.suffix.lower() not in suffixes:
        raise OutputError(f"{option} {path} must end in {' or '.join(suffixes)}; e.g. {path.with_suffix(suffixes[0])}")
    folder = _existing_parent(path.parent)
    if not folder.is_dir():
        raise OutputError(f"{option} {path}: {folder} is not a folder; choose another place")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: {folder} is not writable; choose a folder you can write to")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{option} {path} exists and is read-only; choose another name or make it writable")
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise OutputError(
            f"{option} {path}: {folder} has {free / 2**20:.1f} MB free, {need_bytes / 2**20:.1f} MB is needed; "
            f"free some space or write elsewhere"
        )
    return path


def _existing_parent(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def atomic_write(path, write: Callable[[object], None], *, binary: bool = True) -> Path:
    """``write(f)`` into a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _mode_for(path))  # mkstemp makes 0600; the file gets what a plain open() would give
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _mode_for(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777  # replacing a file keeps its permissions
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), binary=False)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs: the owner of a ``.NAME.tmp-PID-*`` folder, which is left alone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def replace_folder(tmp: Path, final: Path) -> None:
    """Rename the complete folder ``tmp`` to ``final``, replacing an earlier one only once the new one is in
    place (the earlier one waits as ``.NAME.old-PID-*`` and comes back if the rename fails)."""
    if not final.exists():
        os.rename(tmp, final)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-{os.getpid()}-", dir=final.parent))
    os.rmdir(old)
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
