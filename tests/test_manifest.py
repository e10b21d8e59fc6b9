"""The manifest reader refuses incomplete or tampered exports with a message that names the fix."""

import json

import pytest

from registry import manifest
from registry.manifest import ManifestError


def make_export(folder, data_bytes=10):
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "model.onnx").write_bytes(b"x" * 5)
    (folder / "unet" / "model.onnx_data").write_bytes(b"y" * 10)
    manifest.write(
        folder,
        {
            "model_id": None,
            "family": "sd15",
            "components": {
                "unet": {
                    "path": "unet/model.onnx",
                    "bytes": 5,
                    "data_path": "unet/model.onnx_data",
                    "data_bytes": data_bytes,
                }
            },
        },
    )


def test_a_complete_export_reads(tmp_path):
    make_export(tmp_path)
    m = manifest.read(tmp_path)
    assert m.family == "sd15" and m.weights_bytes() == 15


def test_external_weights_are_checked(tmp_path):
    make_export(tmp_path, data_bytes=11)
    with pytest.raises(
        ManifestError, match="model.onnx_data is 10 bytes, the manifest says 11.*export the model again"
    ):
        manifest.read(tmp_path)
    (tmp_path / "unet" / "model.onnx_data").unlink()
    with pytest.raises(ManifestError, match="model.onnx_data is missing"):
        manifest.read(tmp_path)


def test_missing_or_broken_manifest(tmp_path):
    with pytest.raises(ManifestError, match="not a folder"):
        manifest.read(tmp_path / "nope")
    with pytest.raises(ManifestError, match="not a complete Stepwise export"):
        manifest.read(tmp_path)
    (tmp_path / "stepwise.json").write_text("{")
    with pytest.raises(ManifestError, match="not valid JSON"):
        manifest.read(tmp_path)
    (tmp_path / "stepwise.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(ManifestError, match="format 99"):
        manifest.read(tmp_path)
