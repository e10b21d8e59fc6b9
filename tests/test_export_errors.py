"""What the caller can get wrong, and what a failed export leaves behind: one-line ExportErrors, no folder.

Every error here is raised before or instead of a complete export; the ones after loading use the
tiny pipelines (a second to build), the mid-export failures stop at the first or second graph.
"""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import exporters  # noqa: E402
from exporters import backends, validate  # noqa: E402


def export_error(source, **kwargs) -> str:
    with pytest.raises(exporters.ExportError) as info:
        exporters.export(source, progress=None, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message and len(message) < 400
    return message


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A private STEPWISE_HOME and an empty, offline Hugging Face cache: nothing escapes the test."""
    monkeypatch.setenv("STEPWISE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def leftovers(home) -> list[str]:
    models = home / "models"
    return sorted(p.name for p in models.iterdir()) if models.exists() else []


# --- bad sources and registry mismatches ---------------------------------------------------------------


def test_folder_without_model_index(tmp_path):
    folder = tmp_path / "not-a-pipeline"
    folder.mkdir()
    (folder / "unet.safetensors").write_bytes(b"")
    message = export_error(str(folder))
    assert "model_index.json" in message and str(folder) in message


def test_pipeline_class_stepwise_cannot_export(tmp_path):
    folder = tmp_path / "kandinsky"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    message = export_error(str(folder))
    assert (
        "KandinskyV22Pipeline" in message
        and "sdxl: StableDiffusionXL" in message
        and "hidream: HiDreamImage" in message
    )


def test_unknown_tiny_family():
    message = export_error("tiny:sd2")
    assert "tiny:sd2" in message and "tiny:sd15" in message and "tiny:flux-dev" in message


def test_neither_folder_nor_repo_nor_tiny():
    assert "tiny:<family>" in export_error("a photo of a cat")
    assert "does not exist" in export_error("./no/such/folder")


def test_model_of_another_family():
    message = export_error("tiny:sd15", model_id="sdxl-turbo")
    assert "sdxl-turbo" in message and "sd15" in message and "sdxl" in message


def without_engine(monkeypatch, family: str) -> None:
    """Every registry family has an engine now: the refusal is tested on one marked engine-less here."""
    import dataclasses

    from registry import models

    families = {**models.families(), family: dataclasses.replace(models.families()[family], exportable=False)}
    monkeypatch.setattr(models, "families", lambda: families)


def test_unknown_and_unexportable_models(monkeypatch):
    assert "known models" in export_error("tiny:sd15", model_id="sd9")
    without_engine(monkeypatch, "hidream")
    assert "cannot export" in export_error("tiny:sd15", model_id="hidream-i1")


@pytest.mark.parametrize(
    "source, model_id",
    [("tiny:flux-schnell", "flux-dev"), ("tiny:sd15", "lcm"), ("tiny:lcm", "sd15")],
)
def test_model_whose_guidance_embedding_does_not_fit(source, model_id, isolated):
    message = export_error(source, model_id=model_id)
    assert model_id in message and "guidance" in message
    assert leftovers(isolated / "home") == []


def test_hub_source_offline_with_nothing_cached(isolated):
    message = export_error("stabilityai/sdxl-turbo")
    assert "HF_HUB_OFFLINE" in message and "stabilityai/sdxl-turbo" in message
    assert str(isolated / "hf") in message  # names the cache it looked in


def test_hub_part_offline_with_nothing_cached():
    message = export_error("tiny:sd15", unet="ByteDance/SDXL-Lightning:sdxl_lightning_4step_unet.safetensors")
    assert "HF_HUB_OFFLINE" in message and "sdxl_lightning_4step_unet.safetensors" in message


def test_missing_part_files(tmp_path):
    assert "not found" in export_error("tiny:sd15", unet=str(tmp_path / "nope.safetensors"))
    assert "not found" in export_error("tiny:sd15", lora=str(tmp_path / "nope.safetensors"))


def test_unet_weights_of_another_architecture(tmp_path):
    from safetensors.torch import save_file

    vae = exporters.build_tiny("sd15").vae
    path = tmp_path / "vae_not_unet.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))
    message = export_error("tiny:sd15", unet=str(path))
    assert "do not fit" in message and "unet" in message


def test_lora_without_peft(tmp_path, monkeypatch):
    import importlib.util

    path = tmp_path / "lora.safetensors"
    path.write_bytes(b"x")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    assert "peft" in export_error("tiny:sd15", lora=str(path))


def test_bad_opset_and_missing_optimum(monkeypatch):
    assert "opset" in export_error("tiny:sd15", opset=9)
    monkeypatch.setattr(backends, "optimum_available", lambda: False)
    assert "optimum" in export_error("tiny:sd15", use_optimum=True)


def test_without_optimum_the_torch_onnx_exporter_is_chosen(monkeypatch):
    monkeypatch.setattr(backends, "optimum_available", lambda: False)
    assert backends.make(None, None).name == "torch.onnx"
    assert backends.make(False, None).name == "torch.onnx"


def test_out_that_is_someone_elses_folder(tmp_path):
    out = tmp_path / "my-photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"jpeg")
    assert "not a Stepwise export" in export_error("tiny:sd15", out=str(out))
    assert (out / "holiday.jpg").read_bytes() == b"jpeg"


# --- failures in the middle of an export ---------------------------------------------------------------


def test_exporter_failure_leaves_nothing(isolated, monkeypatch):
    def boom(self, component, path, opset):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a graph")
        raise RuntimeError("tracer exploded")

    monkeypatch.setattr(backends.TorchOnnx, "export", boom)
    message = export_error("tiny:sd15", use_optimum=False)
    assert "exporting text_encoder failed" in message and "tracer exploded" in message
    assert leftovers(isolated / "home") == []


def test_validation_failure_leaves_nothing(isolated, monkeypatch):
    real = validate.check

    def fail_on_text_encoder(component, path, refs, **kwargs):
        assert path.is_file()  # the graph was written (into the temporary folder) before validation
        if path.parent.name == "text_encoder":
            raise validate.ValidationFailed("max|onnx - torch| = 0.5 exceeds the tolerance 0.001")
        return real(component, path, refs, **kwargs)

    monkeypatch.setattr(validate, "check", fail_on_text_encoder)
    message = export_error("tiny:sd15", use_optimum=False)
    assert "validating text_encoder failed" in message and "0.5" in message
    assert leftovers(isolated / "home") == []


@pytest.mark.slow
def test_interrupt_leaves_nothing_and_keeps_the_previous_export(isolated, monkeypatch, exported_tiny):
    final = isolated / "home" / "models" / "tiny-sd15"
    shutil.copytree(exported_tiny("sd15"), final)
    before = (final / "stepwise.json").read_text()

    def interrupted(self, component, path, opset):
        raise KeyboardInterrupt

    monkeypatch.setattr(backends.TorchOnnx, "export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        exporters.export("tiny:sd15", use_optimum=False, progress=None)
    assert leftovers(isolated / "home") == ["tiny-sd15"]
    assert (final / "stepwise.json").read_text() == before


# --- hub helpers (no network: the file listing and the errors are simulated) -----------------------------

SD15_REPO_FILES = [
    ".gitattributes",
    "README.md",
    "model_index.json",
    "v1-5-pruned.ckpt",
    "v1-5-pruned-emaonly.safetensors",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.bin",  # a folder with .bin weights only
    "text_encoder_3/config.json",
    "text_encoder_3/model-00001-of-00002.safetensors",
    "text_encoder_3/model-00002-of-00002.safetensors",
    "text_encoder_3/model.safetensors.index.json",
    "text_encoder_3/model.safetensors.index.fp16.json",
    "tokenizer_3/spiece.model",
    "tokenizer_3/tokenizer.json",
]


def test_hub_download_takes_only_the_default_weights_of_needed_folders():
    from exporters import sources

    index = {
        "_class_name": "StableDiffusionPipeline",
        **{name: ["x", "y"] for name in ("scheduler", "text_encoder", "tokenizer", "unet", "vae", "safety_checker")},
        **{name: ["x", "y"] for name in ("feature_extractor", "text_encoder_3", "tokenizer_3")},
    }
    wanted = set(sources.select_files(SD15_REPO_FILES, index))
    assert wanted == {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.bin",
        "text_encoder_3/config.json",
        "text_encoder_3/model-00001-of-00002.safetensors",
        "text_encoder_3/model-00002-of-00002.safetensors",
        "text_encoder_3/model.safetensors.index.json",
        "tokenizer_3/spiece.model",
        "tokenizer_3/tokenizer.json",
    }


def test_hub_listing_failure_without_cache_is_reported_not_a_full_download(monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    from exporters import sources

    def refuse(self, repo):
        raise errors.GatedRepoError("403 gated")

    def no_download(*args, **kwargs):
        raise AssertionError("must not download without a file list")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", refuse)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    with pytest.raises(exporters.ExportError, match="HF_TOKEN"):
        sources.hub_snapshot("black-forest-labs/FLUX.1-dev", {"_class_name": "FluxPipeline"})


def test_hub_errors_are_one_line_with_the_fix(monkeypatch):
    from huggingface_hub import errors

    from exporters import sources

    gated = sources.hub_error(errors.GatedRepoError("401"), "black-forest-labs/FLUX.1-dev", "model_index.json")
    assert "HF_TOKEN" in str(gated) and "https://huggingface.co/black-forest-labs/FLUX.1-dev" in str(gated)
    missing = sources.hub_error(errors.RepositoryNotFoundError("404"), "org/typo", "model_index.json")
    assert "not found" in str(missing)
    no_index = sources.hub_error(errors.EntryNotFoundError("404"), "org/llm", "model_index.json")
    assert "no model_index.json" in str(no_index)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    network = sources.hub_error(errors.LocalEntryNotFoundError("no network"), "org/x", "model_index.json")
    assert "network" in str(network) and "\n" not in str(network)
    server = sources.hub_error(errors.HfHubHTTPError("500 Server Error\ndetails"), "org/x", "model_index.json")
    assert "500 Server Error" in str(server) and "\n" not in str(server)
