"""A stand-in for ``exporters.export`` while that package is being written: the same folder layout and
manifest (docs/design.md), graphs from ``torch.onnx.export`` (TorchScript, opset 17), no validation.

Only for the benchmark's SD 1.5-architecture pipelines; remove once ``exporters.export`` handles folders.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from registry import manifest as manifest_format

OPSET = 17


def _onnx_export(module, args, path: Path, inputs, outputs, dynamic_axes):
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    # > 2 GB graphs come out as one file per tensor: gather them into model.onnx_data as optimum does
    import onnx

    extras = [f for f in path.parent.iterdir() if f.name not in (path.name, "config.json")]
    if extras:
        model = onnx.load(str(path))  # pulls the per-tensor files in
        for extra in extras:
            extra.unlink()
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx_data"
        )


class _UNet:
    def __init__(self, unet):
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.unet = unet

            def forward(self, sample, timestep, encoder_hidden_states):
                return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

        self.module = Wrapped().eval()


def export(source: str, out, progress=print) -> Path:
    import torch
    from diffusers import StableDiffusionPipeline

    out = Path(out)
    pipe = StableDiffusionPipeline.from_pretrained(source, safety_checker=None)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)  # tracing refuses parameters that require grad as constants
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    te = pipe.text_encoder
    progress("  text_encoder")
    ids = torch.zeros(1, 77, dtype=torch.int64)

    class TextEncoder(torch.nn.Module):
        def forward(self, input_ids):
            o = te(input_ids, output_hidden_states=True, return_dict=True)
            return (o.last_hidden_state, o.pooler_output, *o.hidden_states)

    layers = te.config.num_hidden_layers
    te_outputs = ["last_hidden_state", "pooler_output"] + [f"hidden_states.{i}" for i in range(layers + 1)]
    _onnx_export(
        TextEncoder().eval(),
        (ids,),
        tmp / "text_encoder/model.onnx",
        ["input_ids"],
        te_outputs,
        {"input_ids": {0: "b"}},
    )

    progress("  unet")
    unet = pipe.unet
    args = (torch.randn(2, 4, 64, 64), torch.tensor(999.0), torch.randn(2, 77, te.config.hidden_size))
    _onnx_export(
        _UNet(unet).module,
        args,
        tmp / "unet/model.onnx",
        ["sample", "timestep", "encoder_hidden_states"],
        ["out_sample"],
        {"sample": {0: "b", 2: "h", 3: "w"}, "encoder_hidden_states": {0: "b", 1: "s"}, "out_sample": {0: "b"}},
    )

    progress("  vae_decoder")
    vae = pipe.vae

    class Decoder(torch.nn.Module):
        def forward(self, latent_sample):
            return vae.decode(latent_sample, return_dict=False)[0]

    _onnx_export(
        Decoder().eval(),
        (torch.randn(1, 4, 64, 64),),
        tmp / "vae_decoder/model.onnx",
        ["latent_sample"],
        ["sample"],
        {"latent_sample": {0: "b", 2: "h", 3: "w"}},
    )

    for name in ("unet", "vae", "text_encoder"):
        sub = "vae_decoder" if name == "vae" else name
        shutil.copy(Path(source) / name / "config.json", tmp / sub / "config.json")
    for name in ("tokenizer", "scheduler"):
        shutil.copytree(Path(source) / name, tmp / name)
    from transformers import CLIPTokenizerFast

    CLIPTokenizerFast.from_pretrained(tmp / "tokenizer").save_pretrained(tmp / "tokenizer")  # tokenizer.json
    shutil.copy(Path(source) / "model_index.json", tmp / "model_index.json")

    components = {}
    for name in ("text_encoder", "unet", "vae_decoder"):
        path = tmp / name / "model.onnx"
        entry = {"path": f"{name}/model.onnx", "bytes": path.stat().st_size}
        data = path.with_name("model.onnx_data")
        if data.is_file():
            entry["data_bytes"] = data.stat().st_size
        components[name] = entry
    manifest_format.write(
        tmp,
        {
            "model_id": None,
            "family": "sd15",
            "source": str(source),
            "random_weights": True,
            "opset": OPSET,
            "precision": "fp32",
            "exporter": "torch.onnx (bench stand-in)",
            "components": components,
            "config": {
                "vae_scaling_factor": vae.config.scaling_factor,
                "vae_shift_factor": None,
                "vae_scale_factor": 8,
                "latent_channels": 4,
                "text_encoder_layers": {"text_encoder": layers},
                "time_cond_proj_dim": None,
                "requires_aesthetics_score": False,
                "max_sequence_length": None,
            },
        },
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    json.loads((out / "stepwise.json").read_text())
    return out
