"""The graph cache of engine/session.py: ONNX Runtime's optimised graph saved once beside the export
(``<component>/.ort-cache/<key>/``) and loaded instead of ``model.onnx`` afterwards, never changing outputs
and never standing in the way (disabled, corrupt, read-only, stale).

Every test works on a copy of the tiny SD 1.5 export; which file each session is created from, and with
which options, is recorded by a spy on ``onnxruntime.InferenceSession``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import engine
from engine import session as session_mod
from engine.session import CACHE_DIR, Graph, cache_entry
from registry import manifest as manifest_io

pytestmark = pytest.mark.slow

ALL = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

Call = namedtuple("Call", "path level saved_to mem_pattern sequential threads")


@pytest.fixture
def export(tmp_path, exported_tiny, monkeypatch):
    """A private copy of the tiny SD 1.5 export, with the cache enabled whatever the caller's environment."""
    monkeypatch.delenv("STEPWISE_GRAPH_CACHE", raising=False)
    folder = tmp_path / "sd15"
    shutil.copytree(exported_tiny("sd15"), folder, ignore=shutil.ignore_patterns(CACHE_DIR))
    return folder


@pytest.fixture
def unet(export):
    return export / "unet" / "model.onnx"


@pytest.fixture
def calls(monkeypatch):
    """Every InferenceSession the engine creates: (file, level, optimized_model_filepath, options...)."""
    made = []
    real = ort.InferenceSession

    def spy(path, options=None, *args, **kwargs):
        made.append(
            Call(
                Path(path),
                options.graph_optimization_level,
                options.optimized_model_filepath,
                options.enable_mem_pattern,
                options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL,
                options.intra_op_num_threads,
            )
        )
        return real(path, options, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    return made


def feeds(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "sample": rng.standard_normal((2, 4, 16, 24), dtype=np.float32),
        "timestep": np.float32(301.0),
        "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32),
    }


def plain_output(unet, monkeypatch):
    with monkeypatch.context() as m:
        m.setenv("STEPWISE_GRAPH_CACHE", "0")
        return Graph(unet, threads=1)(**feeds())["out_sample"]


def entries(unet):
    root = unet.parent / CACHE_DIR
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def assert_same(a, b):
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1e-6, f"cached graph differs by {np.abs(a - b).max()}"


def test_first_load_writes_the_cache_and_the_second_loads_it(unet, calls, monkeypatch):
    first = Graph(unet, threads=1)
    entry = cache_entry(unet)
    assert entries(unet) == [entry.name]  # one entry, no temporary folder left
    assert {"model.onnx", "model.onnx.data", "entry.json"} <= {p.name for p in entry.iterdir()}
    info = json.loads((entry / "entry.json").read_text())
    assert info["onnxruntime"] == ort.__version__
    assert info["cpu"] == session_mod.cpu_identity()  # saved at ALL: the NCHWc layout depends on the CPU
    # one session, the engine's own (ALL, mem pattern off, sequential, threads), saving as it loads
    assert len(calls) == 1 and calls[0][:2] == (unet, ALL) and calls[0][3:] == (False, True, 1)
    assert Path(calls[0].saved_to).parent.parent == unet.parent / CACHE_DIR  # a temporary folder, renamed

    calls.clear()
    second = Graph(unet, threads=1)
    assert calls == [Call(entry / "model.onnx", ALL, "", False, True, 1)]  # read, not written again
    assert second.inputs == first.inputs and second.outputs == first.outputs

    expected = plain_output(unet, monkeypatch)
    assert calls[-1].path == unet  # the reference really is the plain graph
    assert_same(first(**feeds())["out_sample"], expected)
    assert_same(second(**feeds())["out_sample"], expected)


def test_disabled_by_the_environment_writes_nothing(unet, calls, monkeypatch):
    monkeypatch.setenv("STEPWISE_GRAPH_CACHE", "0")
    Graph(unet, threads=1)
    assert [(c.path, c.level, c.saved_to) for c in calls] == [(unet, ALL, "")]
    assert not (unet.parent / CACHE_DIR).exists()


def test_corrupt_entry_is_removed_and_the_plain_graph_loads(unet, calls, monkeypatch):
    Graph(unet, threads=1)
    entry = cache_entry(unet)
    saved = entry / "model.onnx"
    saved.write_bytes(b"\xff" * saved.stat().st_size)  # same size: only onnxruntime can tell
    calls.clear()
    graph = Graph(unet, threads=1)
    assert [(c.path, c.level) for c in calls] == [(saved, ALL), (unet, ALL)]
    assert entries(unet) == []
    assert_same(graph(**feeds())["out_sample"], plain_output(unet, monkeypatch))
    calls.clear()
    Graph(unet, threads=1)  # the next load writes a fresh entry
    assert [(c.path, bool(c.saved_to)) for c in calls] == [(unet, True)] and entries(unet) == [entry.name]


def test_truncated_entry_is_rewritten_without_being_loaded(unet, calls):
    Graph(unet, threads=1)
    entry = cache_entry(unet)
    data = entry / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:100])  # a write cut short: its size is not the recorded one
    calls.clear()
    Graph(unet, threads=1)
    assert [(c.path, c.level, bool(c.saved_to)) for c in calls] == [(unet, ALL, True)]
    assert entries(unet) == [entry.name] and data.stat().st_size > 100


@pytest.fixture
def read_only(monkeypatch):
    """Make a folder read-only; as root (whom permissions do not stop) refuse its writes as the kernel would."""
    changed = []

    def make(folder: Path):
        folder.chmod(0o555)
        changed.append(folder)
        if os.geteuid() == 0:
            real_mkdir = os.mkdir

            def mkdir(path, *args, **kwargs):
                if Path(path).resolve().is_relative_to(folder.resolve()):
                    raise PermissionError(13, "Permission denied", str(path))
                return real_mkdir(path, *args, **kwargs)

            monkeypatch.setattr(os, "mkdir", mkdir)

    yield make
    for folder in changed:
        folder.chmod(0o755)


def test_read_only_component_folder_falls_back_without_error(unet, calls, read_only, monkeypatch):
    read_only(unet.parent)
    graph = Graph(unet, threads=1)
    assert [(c.path, c.level, c.saved_to) for c in calls] == [(unet, ALL, "")]
    assert not (unet.parent / CACHE_DIR).exists()
    assert_same(graph(**feeds())["out_sample"], plain_output(unet, monkeypatch))


def test_read_only_folder_still_reads_an_existing_entry(unet, calls, read_only):
    Graph(unet, threads=1)
    read_only(unet.parent / CACHE_DIR)
    calls.clear()
    Graph(unet, threads=1)
    assert [c.path for c in calls] == [cache_entry(unet) / "model.onnx"]


def test_a_changed_graph_invalidates_and_old_entries_are_removed(unet, calls):
    onnx = pytest.importorskip("onnx")
    Graph(unet, threads=1)
    old = cache_entry(unet)
    root = unet.parent / CACHE_DIR
    stale_tmp = root / ".tmp-killed"  # a writer killed an hour ago
    stale_tmp.mkdir()
    os.utime(stale_tmp, (1, 1))
    busy_tmp = root / ".tmp-busy"  # another process writing right now
    busy_tmp.mkdir()

    st = unet.stat()
    os.utime(unet, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # same bytes, new mtime (a re-export)
    assert cache_entry(unet) != old
    calls.clear()
    Graph(unet, threads=1)
    touched = cache_entry(unet)
    assert calls[0].path == unet and calls[0].saved_to  # a new entry is written
    assert entries(unet) == sorted([".tmp-busy", touched.name])

    model = onnx.load(str(unet), load_external_data=False)
    model.doc_string = "re-exported"  # a different size
    onnx.save(model, str(unet))
    assert unet.stat().st_size != st.st_size
    calls.clear()
    graph = Graph(unet, threads=1)
    assert calls[0].path == unet and calls[0].saved_to
    assert entries(unet) == sorted([".tmp-busy", cache_entry(unet).name]) and cache_entry(unet) != touched
    assert graph(**feeds())["out_sample"].shape == (2, 4, 16, 24)


def test_a_short_disk_or_a_failing_save_falls_back_and_leaves_nothing(unet, calls, monkeypatch):
    real_disk_usage = shutil.disk_usage
    usage = real_disk_usage(unet.parent)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10 * 2**20))
    Graph(unet, threads=1)
    assert [(c.path, c.level, c.saved_to) for c in calls] == [(unet, ALL, "")]
    assert entries(unet) == []
    monkeypatch.setattr(shutil, "disk_usage", real_disk_usage)  # (not undo(): that would turn the cache off)

    real = ort.InferenceSession

    failure = RuntimeError("disk full")

    def failing_save(path, options=None, *args, **kwargs):
        if options.optimized_model_filepath:
            Path(options.optimized_model_filepath).write_bytes(b"half")  # a partial file, then a failure
            raise failure
        return real(path, options, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", failing_save)
    graph = Graph(unet, threads=1)
    assert graph.session is not None
    assert entries(unet) == []  # no half-written entry, no temporary folder
    failure = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        Graph(unet, threads=1)
    assert entries(unet) == []  # interrupted: nothing left either


def test_pipeline_with_the_cache_matches_without_and_the_manifest_still_reads(export, monkeypatch):
    def generate():
        pipe = engine.load_pipeline(export, threads=1)
        latents = np.random.default_rng(3).standard_normal(pipe.family.latent_shape(64, 64), dtype=np.float32)
        return pipe.generate(prompt="a red apple", steps=2, guidance=7.5, width=64, height=64, seed=0, latents=latents)

    monkeypatch.setenv("STEPWISE_GRAPH_CACHE", "0")
    plain = generate()
    assert not list(export.glob(f"*/{CACHE_DIR}"))
    monkeypatch.setenv("STEPWISE_GRAPH_CACHE", "1")
    cold, warm = generate(), generate()
    assert sorted(p.parent.name for p in export.glob(f"*/{CACHE_DIR}")) == sorted(
        # a resident pipeline loads every session it may run, the VAE encoder (image-to-image) included
        name
        for name in manifest_io.read(export).components
        if name in ("text_encoder", "unet", "vae_encoder", "vae_decoder")
    )
    manifest_io.read(export)  # the hidden folders disturb neither the manifest check nor its file sizes
    for run in (cold, warm):
        assert np.abs(run.latents - plain.latents).max() <= 1e-6
        assert np.abs(run.image.astype(int) - plain.image.astype(int)).max() <= 1
    assert session_mod.cache_enabled()
