"""--unet and --lora on a tiny pipeline: the exported UNet computes what PyTorch computes with the same parts.

The UNet file is a full state dict of a differently seeded tiny UNet (SDXL-Lightning ships its UNet the
same way); the LoRA is a peft adapter with random (non-zero) weights saved in diffusers' LoRA format.
Both are applied in one export, and the reference is ``build_tiny`` + the same file + the same LoRA fused
at the same scale, so an export that ignored either part would not match.
"""

from __future__ import annotations

import numpy as np
import pytest

from registry import manifest as manifest_io

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
ort = pytest.importorskip("onnxruntime")

import exporters  # noqa: E402

pytestmark = pytest.mark.slow
LORA_SCALE = 0.7


def make_unet_file(path):
    from safetensors.torch import save_file

    from exporters import tiny

    unet = tiny._unet_sd15(seed=99)  # same architecture, other weights
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(path))
    return path


def make_lora_file(folder):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = exporters.build_tiny("sd15")
    torch.manual_seed(7)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    pipe.unet.add_adapter(config)
    StableDiffusionPipeline.save_lora_weights(
        str(folder),
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        weight_name="tiny_lora.safetensors",
        safe_serialization=True,
    )
    return folder / "tiny_lora.safetensors"


def reference_pipeline(unet_file=None, lora_file=None):
    from safetensors.torch import load_file

    pipe = exporters.build_tiny("sd15")
    if unet_file:
        pipe.unet.load_state_dict(load_file(str(unet_file)))
    if lora_file:
        pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
        pipe.fuse_lora(lora_scale=LORA_SCALE)
        pipe.unload_lora_weights()
    return pipe


def unet_inputs(batch, h, w, seed):
    rng = np.random.default_rng(seed)
    return {
        "sample": rng.standard_normal((batch, 4, h, w), dtype=np.float32),
        "timestep": np.array(301.0, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, 77, 32), dtype=np.float32),
    }


def torch_unet(pipe, feeds):
    with torch.no_grad():
        return (
            pipe.unet(
                torch.from_numpy(feeds["sample"]),
                torch.from_numpy(feeds["timestep"]),
                encoder_hidden_states=torch.from_numpy(feeds["encoder_hidden_states"]),
            )
            .sample.detach()
            .numpy()
        )


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """One export with both parts. It also stores every graph's weights as external data
    (``model.onnx_data``, what a > 2 GB UNet gets), so every check below runs on that layout too."""
    from exporters import backends

    folder = tmp_path_factory.mktemp("parts")
    unet_file = make_unet_file(folder / "other_unet.safetensors")
    lora_file = make_lora_file(folder)
    consolidate = backends.consolidate_external_data
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backends, "consolidate_external_data", lambda path: consolidate(path, force=True))
        out = exporters.export(
            "tiny:sd15",
            out=folder / "export",
            unet=str(unet_file),
            lora=str(lora_file),
            lora_scale=LORA_SCALE,
            progress=None,
        )
    return out, unet_file, lora_file


def test_manifest_records_the_parts(parts):
    out, unet_file, lora_file = parts
    data = manifest_io.read(out).data
    assert data["parts"] == {"unet": str(unet_file), "lora": str(lora_file), "lora_scale": LORA_SCALE}
    for entry in data["components"].values():
        assert entry["validation"]["max_abs_diff"] <= entry["validation"]["tolerance"]


def test_external_data_layout(parts):
    out, _, _ = parts
    manifest = manifest_io.read(out)
    for name, entry in manifest.components.items():
        data = out / entry["data_path"]
        assert entry["data_path"] == f"{name}/model.onnx_data"
        assert data.stat().st_size == entry["data_bytes"] > 4 * entry["params"] * 0.9
        assert entry["data_sha256"] == manifest_io.sha256_of(data)
        assert entry["bytes"] < entry["data_bytes"]  # the graph file holds no weights
        assert sorted(p.name for p in (out / name).iterdir()) == ["config.json", "model.onnx", "model.onnx_data"]
    assert manifest.weights_bytes() == sum(e["bytes"] + e["data_bytes"] for e in manifest.components.values())


def test_exported_unet_has_the_replaced_weights_and_the_fused_lora(parts):
    out, unet_file, lora_file = parts
    sess = ort.InferenceSession(str(out / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    both = reference_pipeline(unet_file, lora_file)
    unet_only = reference_pipeline(unet_file)
    base = exporters.build_tiny("sd15")
    for batch, h, w in ((1, 24, 40), (2, 32, 16)):
        feeds = unet_inputs(batch, h, w, seed=batch)
        got = sess.run(["out_sample"], feeds)[0]
        assert np.abs(got - torch_unet(both, feeds)).max() <= 1e-4
        # and each part matters: without the LoRA, or with the original UNet, the output is different
        assert np.abs(got - torch_unet(unet_only, feeds)).max() > 1e-2
        assert np.abs(got - torch_unet(base, feeds)).max() > 1e-2


def test_lora_only_touches_the_unet(parts):
    """The LoRA has no text-encoder layers, so the exported text encoder is the tiny one unchanged."""
    out, _, _ = parts
    sess = ort.InferenceSession(str(out / "text_encoder" / "model.onnx"), providers=["CPUExecutionProvider"])
    base = exporters.build_tiny("sd15")
    ids = base.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="np").input_ids
    got = sess.run(["last_hidden_state"], {"input_ids": ids.astype(np.int64)})[0]
    with torch.no_grad():
        expected = base.text_encoder(torch.from_numpy(ids)).last_hidden_state.numpy()
    assert np.abs(got - expected).max() <= 1e-4
