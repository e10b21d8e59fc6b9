"""A hub repo id as SOURCE, served from the Hugging Face cache with HF_HUB_OFFLINE=1 (there is no network).

The cache is laid out the way huggingface_hub lays it out (``models--org--name/refs/main`` +
``snapshots/<commit>/``), holding a tiny SD 1.5 pipeline saved with ``save_pretrained`` under the repo id
the registry gives SD 1.5. That exercises: the cache honoured via HF_HOME read at call time, the offline
flag, loading a saved pipeline folder (what a real download is), the registry id taken from the hub id,
the default output folder under STEPWISE_HOME, and replacing an earlier export in place.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import registry
from registry import manifest as manifest_io

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

import exporters  # noqa: E402

pytestmark = pytest.mark.slow
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(hf_home, repo: str, pipeline):
    repo_dir = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / COMMIT
    pipeline.save_pretrained(str(snapshot), safe_serialization=True)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_hub_repo_from_the_offline_cache(tmp_path, monkeypatch, exported_tiny):
    repo = registry.get("sd15").hub_id
    pipeline = exporters.build_tiny("sd15")
    pipeline.scheduler.register_to_config(steps_offset=0)  # a checkpoint whose scheduler differs from the registry's
    snapshot = fake_hub_cache(tmp_path / "hf", repo, pipeline)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("STEPWISE_HOME", str(tmp_path / "home"))

    # an earlier export at the default path is replaced only once the new one is complete
    final = registry.models_home() / "sd15"
    shutil.copytree(exported_tiny("sd15"), final)
    (final / "stale-file.txt").write_text("from the previous export")

    lines = []
    folder = exporters.export(repo, progress=lines.append)

    assert folder == final
    assert not (final / "stale-file.txt").exists()
    assert sorted(p.name for p in final.parent.iterdir()) == ["sd15"]  # no temp or old folders left
    data = manifest_io.read(folder).data
    assert data["model_id"] == "sd15"  # the registry entry whose hub_id this is
    assert data["source"] == repo and data["random_weights"] is False and data["family"] == "sd15"
    assert json.loads((folder / "model_index.json").read_text()) == json.loads(
        (snapshot / "model_index.json").read_text()
    )
    # tied to the registry entry, the export carries the entry's scheduler config, not the checkpoint's
    assert data["scheduler_source"] == "registry:sd15"
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler == registry.get("sd15").scheduler
    assert json.loads((snapshot / "scheduler" / "scheduler_config.json").read_text())["steps_offset"] == 0
    assert any(line.startswith("loading ") for line in lines)
    assert any(line.startswith("exporting unet") for line in lines)
    # a hub checkpoint's UNet is streamed from the snapshot's safetensors, never loaded whole
    assert any(line.startswith("exporting unet: tracing on the meta device") for line in lines)
    assert any(line.startswith("validating unet (whole): max|diff|") for line in lines)

    # the weights came from the cached snapshot: the UNet graph matches the tiny UNet
    sess = ort.InferenceSession(str(folder / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((1, 4, 16, 24), dtype=np.float32),
        "timestep": np.array(10.0, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((1, 77, 32), dtype=np.float32),
    }
    unet = exporters.build_tiny("sd15").unet
    with torch.no_grad():
        expected = unet(
            *(torch.from_numpy(feeds[k]) for k in ("sample", "timestep")),
            encoder_hidden_states=torch.from_numpy(feeds["encoder_hidden_states"]),
        ).sample.numpy()
    assert np.abs(sess.run(["out_sample"], feeds)[0] - expected).max() <= 1e-4


def test_local_pipeline_folder(tmp_path, monkeypatch):
    """A folder SOURCE gets model_id null, its folder name as the default name, and --model ties it."""
    folder = tmp_path / "My-SDXL"
    exporters.build_tiny("sdxl").save_pretrained(str(folder))
    monkeypatch.setenv("STEPWISE_HOME", str(tmp_path / "home"))
    with pytest.raises(exporters.ExportError, match="sdxl-turbo"):
        exporters.export(str(folder), model_id="sd15", progress=None)
    from exporters import sources

    source = sources.resolve(str(folder))
    assert (source.kind, source.family, source.name, source.pipeline_class) == (
        "folder",
        "sdxl",
        "My-SDXL",
        "StableDiffusionXLPipeline",
    )
