"""ONNX Runtime sessions on the CPU execution provider, and feeding them without surprises.

The graph cache: creating a session spends seconds optimising the graph and copying the weights (the
full-size SD 1.5 UNet: 12-18 s). So the session that loads ``<component>/model.onnx`` the first time also
saves ONNX Runtime's optimised graph (``optimized_model_filepath``, at the engine's own level
``ORT_ENABLE_ALL``), with its weights in one external file, to ``<component>/.ort-cache/<key>/``; every later
load reads that graph instead (the UNet: about 3 s; docs/benchmarks.md). A graph saved at ALL holds the
NCHWc layout, which depends on the CPU, so ``<key>`` hashes the onnxruntime version, the CPU (model and
instruction-set flags) and the name, size and mtime of every file in the component's folder: another
onnxruntime, another CPU or a re-export gets a new entry, and the entries of other keys are removed when
one is written.

The cache never stands in the way: an entry is written in a temporary folder and renamed into place only
when complete; when the folder is not writable, the disk is short of the component's size plus a margin,
or anything fails, the plain graph is loaded (logged at debug level only), and an entry that cannot be
loaded is deleted. ``STEPWISE_GRAPH_CACHE=0`` turns the cache off (nothing is read or written).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import EngineError

log = logging.getLogger(__name__)

# ONNX tensor type strings → numpy dtypes, so callers can hand any dtype and the graph gets its own.
_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}

CACHE_ENV = "STEPWISE_GRAPH_CACHE"
CACHE_DIR = ".ort-cache"
_ENTRY_INFO = "entry.json"  # written last into an entry: the key's inputs and the saved files' sizes
_DATA_SUFFIX = ".data"  # model.onnx -> model.onnx.data inside an entry
_DISK_MARGIN = 512 * 2**20  # free disk needed beyond the component's own size
_STALE_TMP_S = 3600  # a temporary folder this old was left by a killed writer


# What ONNX Runtime's CPU allocator says when it cannot get memory: its arena (BFCArena: "Failed to allocate
# memory for requested buffer of size N", or "Available memory of M is smaller than requested bytes of N" under
# an arena limit) or the C++ runtime (std::bad_alloc).
_OUT_OF_MEMORY = (
    "Failed to allocate memory",
    "BFCArena",
    "smaller than requested bytes",
    "bad_alloc",
    "bad allocation",
)


def out_of_memory(component: str, exc: BaseException) -> EngineError | None:
    """The one-line error for an allocation failure inside ONNX Runtime while ``component`` ran, else None."""
    text = str(exc)
    if not isinstance(exc, MemoryError) and not any(marker in text for marker in _OUT_OF_MEMORY):
        return None
    asked = re.search(r"(?:requested bytes of|requested buffer of size) (\d+)", text)
    size = f" (an allocation of {int(asked.group(1)) / 2**20:,.0f} MB failed)" if asked else ""
    fixes = ["a smaller --width/--height", "--vae-tiling (the VAE in tiles)", "--low-memory (one phase at a time)"]
    if component.startswith("vae_"):
        fixes.insert(0, fixes.pop(1))
    return EngineError(f"ONNX Runtime ran out of memory running {component}{size}; try {', or '.join(fixes)}")


def physical_cores() -> int:
    """Physical cores: ONNX Runtime gains nothing from SMT siblings on these convolution/matmul graphs."""
    try:
        seen = set()
        physical = core = None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    physical = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                elif not line.strip() and core is not None:
                    seen.add((physical, core))
                    physical = core = None
        if core is not None:
            seen.add((physical, core))
        if seen:
            return len(seen)
    except OSError:
        pass
    return os.cpu_count() or 1


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """The engine's session options (every graph, cached or not, runs with these)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or physical_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # NCHWc convs: 14% faster
    # The memory pattern pre-plans one block per shape; off, SD 1.5 512x512 peaks 3.1 GB lower at the same
    # step time (docs/benchmarks.md, ort_no_mem_pattern). The arena stays on: off is 14% slower.
    options.enable_mem_pattern = False
    options.log_severity_level = 3
    return options


def _new_session(path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# --- the graph cache -----------------------------------------------------------------------------------


def cache_enabled() -> bool:
    return os.environ.get(CACHE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def cpu_identity() -> str:
    """What a graph optimised at ALL depends on: the architecture, the CPU model and its instruction sets."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                name, _, value = line.partition(":")
                name = name.strip()
                if name in ("vendor_id", "model name", "flags", "Features", "CPU implementer", "CPU part"):
                    fields[name] = " ".join(sorted(value.split())) if name in ("flags", "Features") else value.strip()
    except OSError:
        pass
    return json.dumps([platform.machine(), platform.processor(), fields], sort_keys=True)


def _source_files(path: Path) -> list[Path]:
    """The graph and everything beside it (its external weights, config.json), hidden entries excluded."""
    files = [p for p in path.parent.iterdir() if not p.name.startswith(".") and p.is_file()]
    return sorted(files, key=lambda p: p.name)


def cache_key(path: Path) -> tuple[str, dict]:
    """A short key for (onnxruntime, CPU, the graph's files as they are now), and what it was made of."""
    stats = []
    for file in _source_files(path):
        st = file.stat()
        stats.append([file.name, st.st_size, st.st_mtime_ns])
    source = {"onnxruntime": ort.__version__, "cpu": cpu_identity(), "graph": path.name, "files": stats}
    digest = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:20]
    return digest, source


def cache_entry(path: Path) -> Path:
    """The folder the optimised graph of ``path`` is (or would be) cached in."""
    return path.parent / CACHE_DIR / cache_key(path)[0]


def _entry_complete(entry: Path, graph_name: str) -> bool:
    try:
        sizes = json.loads((entry / _ENTRY_INFO).read_text())["sizes"]
        return graph_name in sizes and all((entry / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def _remove_others(root: Path, keep: str) -> None:
    """Entries of other keys (another onnxruntime, a re-export) and temporary folders of killed writers."""
    for child in root.iterdir():
        if child.name == keep:
            continue
        if child.name.startswith(".tmp-"):
            with contextlib.suppress(OSError):
                if time.time() - child.stat().st_mtime < _STALE_TMP_S:
                    continue  # another process may be writing it now
        _remove(child)


def _session_writing_entry(path: Path, threads: int | None, key: str, source: dict) -> ort.InferenceSession | None:
    """The engine's session of ``path``, which also saves its optimised graph into ``.ort-cache/<key>``.

    None when the entry cannot even be started (the caller then creates the plain session).
    """
    root = path.parent / CACHE_DIR
    tmp = None
    try:
        size = sum(file.stat().st_size for file in _source_files(path))
        free = shutil.disk_usage(path.parent).free
        if free < size + max(_DISK_MARGIN, size // 10):
            log.debug("graph cache: %s has %d bytes free, %s needs %d; not caching", path.parent, free, path, size)
            return None
        root.mkdir(exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        options = session_options(threads)
        # Saved at the engine's own level, ALL, by the one session it creates anyway: saving at EXTENDED
        # and loading that at ALL took longer the first time and gained nothing afterwards (docs/benchmarks.md)
        options.optimized_model_filepath = str(tmp / path.name)
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", path.name + _DATA_SUFFIX
        )
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        session = _new_session(path, options)
    except BaseException as exc:  # any failure means: the plain graph, no cache this time
        if tmp is not None:
            _remove(tmp)
        if not isinstance(exc, Exception):
            raise  # interrupted: nothing left behind, and the interrupt goes on
        log.debug("graph cache: not written for %s (%s)", path, exc)
        return None
    try:
        sizes = {file.name: file.stat().st_size for file in tmp.iterdir()}
        if path.name not in sizes:
            raise OSError(f"onnxruntime wrote no {path.name}")
        (tmp / _ENTRY_INFO).write_text(json.dumps({**source, "sizes": sizes}, indent=1) + "\n")
        entry = root / key
        try:
            os.rename(tmp, entry)
        except OSError:
            if not _entry_complete(entry, path.name):  # not another process's finished entry: a failure
                raise
        else:
            tmp = None
        _remove_others(root, keep=key)
    except Exception as exc:  # noqa: BLE001 - the session is good; only the cache is not written
        log.debug("graph cache: not written for %s (%s)", path, exc)
    finally:  # interrupted included: no temporary folder is left behind
        if tmp is not None:
            _remove(tmp)
    return session


def _cached_session(path: Path, threads: int | None) -> ort.InferenceSession | None:
    """The session from the cached optimised graph (saving it first if missing), or None: load the plain one."""
    try:
        key, source = cache_key(path)
    except OSError as exc:
        log.debug("graph cache: cannot stat %s (%s)", path, exc)
        return None
    entry = path.parent / CACHE_DIR / key
    if _entry_complete(entry, path.name):
        options = session_options(threads)
        # The saved graph's nodes are in the order the writing session ran them; ONNX Runtime's default order
        # on it ran most int8 convolutions' DequantizeLinear first in exports made before the exporter gated
        # them on their Conv's input (exporters/weights._gate), widening every weight to fp32 at once (SD 1.5
        # int8 UNet at 512²: 2.74 GB, not 1.54). Node-index order keeps the file's; fp32 graphs run the same
        # either way (docs/benchmarks.md, "int8 UNet and the graph cache").
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        try:
            return _new_session(entry / path.name, options)
        except Exception as exc:  # noqa: BLE001 - a broken entry is deleted and the plain graph loaded
            log.debug("graph cache: %s cannot be loaded (%s); removing it", entry, exc)
            _remove(entry)
            return None
    if entry.exists():  # a write cut short (its files are not the sizes recorded): write it again
        _remove(entry)
    return _session_writing_entry(path, threads, key, source)


class Graph:
    """One exported component: an InferenceSession plus its input dtypes."""

    def __init__(self, path: Path, threads: int | None = None):
        path = Path(path)
        session = _cached_session(path, threads) if cache_enabled() and path.is_file() else None
        if session is None:
            try:
                session = _new_session(path, session_options(threads))
            except Exception as exc:  # onnxruntime raises its own exception types for corrupt files
                raise EngineError(
                    f"{path} cannot be loaded by ONNX Runtime ({str(exc).splitlines()[0][:200]}); "
                    f"export the model again"
                ) from None
        self.session = session
        self.path = path
        self.inputs = {i.name: _DTYPES.get(i.type, np.float32) for i in self.session.get_inputs()}
        self.input_ranks = {i.name: len(i.shape) for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def has_input(self, name: str) -> bool:
        return name in self.inputs

    def __call__(self, outputs: list[str] | None = None, **feeds) -> dict[str, np.ndarray]:
        cast = {}
        for name, value in feeds.items():
            if name not in self.inputs:
                continue  # e.g. SDXL-only inputs handed to an SD 1.5 graph
            value = np.asarray(value, dtype=self.inputs[name])
            if self.input_ranks[name] == 0:
                value = value.reshape(())  # optimum exports the UNet timestep as a scalar
            cast[name] = value
        names = outputs or self.outputs
        try:
            results = self.session.run(names, cast)
        except Exception as exc:
            error = out_of_memory(self.path.parent.name, exc)
            if error is None:
                raise
            raise error from None
        return dict(zip(names, results, strict=True))
