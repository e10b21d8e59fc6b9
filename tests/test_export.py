"""Export every tiny family and check the folder against the contract in docs/design.md.

The independent reference is the PyTorch module itself: ``exporters.build_tiny`` rebuilds the very weights
the export came from, and each ONNX graph is run against the module at shapes that neither the exporter
nor its validation used (batch 1 and 2, non-square), with the module called here the way diffusers calls it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import registry
from registry import manifest as manifest_io

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
tokenizers = pytest.importorskip("tokenizers")

import exporters  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

FAMILIES = ["sd15", "sdxl", "lcm", "sd3", "flux-dev"]
ATOL = 1e-4
# (batch, latent height, latent width): different from the exporter's and the validation's shapes
SHAPES = [(1, 24, 40), (2, 40, 16)]

_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def clip_outputs(layers: int, projection: bool) -> set[str]:
    first = {"text_embeds", "last_hidden_state"} if projection else {"last_hidden_state", "pooler_output"}
    return first | {f"hidden_states.{i}" for i in range(layers + 1)}


UNET = {"sample", "timestep", "encoder_hidden_states"}
VAE = {
    "vae_encoder": ({"sample"}, {"latent_parameters"}),
    "vae_decoder": ({"latent_sample"}, {"sample"}),
}
SD3 = {"hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"}
FLUX = SD3 | {"img_ids", "txt_ids"}

# the graph names of docs/design.md, per family: component -> (inputs, outputs)
CONTRACT = {
    "sd15": {
        "text_encoder": ({"input_ids"}, clip_outputs(3, False)),
        "unet": (UNET, {"out_sample"}),
        **VAE,
    },
    "lcm": {
        "text_encoder": ({"input_ids"}, clip_outputs(3, False)),
        "unet": (UNET | {"timestep_cond"}, {"out_sample"}),
        **VAE,
    },
    "sdxl": {
        "text_encoder": ({"input_ids"}, clip_outputs(3, False)),
        "text_encoder_2": ({"input_ids"}, clip_outputs(4, True)),
        "unet": (UNET | {"text_embeds", "time_ids"}, {"out_sample"}),
        **VAE,
    },
    "sd3": {
        "text_encoder": ({"input_ids"}, clip_outputs(3, True)),
        "text_encoder_2": ({"input_ids"}, clip_outputs(4, True)),
        "text_encoder_3": ({"input_ids"}, {"last_hidden_state"}),
        "transformer": (SD3, {"out_hidden_states"}),
        **VAE,
    },
    "flux-dev": {
        "text_encoder": ({"input_ids"}, clip_outputs(3, False)),
        "text_encoder_2": ({"input_ids"}, {"last_hidden_state"}),
        "transformer": (FLUX | {"guidance"}, {"out_hidden_states"}),
        **VAE,
    },
}

CONFIG = {
    "sd15": {
        "vae_scaling_factor": 0.18215,
        "vae_shift_factor": None,
        "latent_channels": 4,
        "text_encoder_layers": {"text_encoder": 3},
        "time_cond_proj_dim": None,
        "tokenizer_max_length": {"tokenizer": 77},
        "max_sequence_length": None,
        "denoiser": "unet",
    },
    "lcm": {"time_cond_proj_dim": 32, "pipeline_class": "LatentConsistencyModelPipeline"},
    "sdxl": {
        "vae_scaling_factor": 0.13025,
        "text_encoder_layers": {"text_encoder": 3, "text_encoder_2": 4},
        "text_encoder_projection_dim": {"text_encoder_2": 32},
        "addition_time_embed_dim": 8,
        "requires_aesthetics_score": False,
        "force_zeros_for_empty_prompt": True,
        "tokenizer_max_length": {"tokenizer": 77, "tokenizer_2": 77},
    },
    "sd3": {
        "vae_scaling_factor": 1.5305,
        "vae_shift_factor": 0.0609,
        "latent_channels": 16,
        "patch_size": 2,
        "joint_attention_dim": 64,
        "pooled_projection_dim": 64,
        "max_sequence_length": 256,
        "text_encoder_layers": {"text_encoder": 3, "text_encoder_2": 4, "text_encoder_3": 2},
        "denoiser": "transformer",
        "timestep_shape": "batch",
        "timestep_scale": 1.0,
    },
    "flux-dev": {
        "vae_scaling_factor": 0.3611,
        "vae_shift_factor": 0.1159,
        "latent_channels": 16,
        "in_channels": 64,
        "guidance_embeds": True,
        "max_sequence_length": 512,
        "timestep_scale": 0.001,
        "tokenizer_max_length": {"tokenizer": 77, "tokenizer_2": 512},
    },
}


def session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(sess, feeds: dict) -> dict:
    cast = {a.name: np.asarray(feeds[a.name]).astype(_TYPES[a.type]) for a in sess.get_inputs()}
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, cast), strict=True))


def close(onnx_value, torch_value, what):
    torch_value = torch_value.detach().numpy()
    assert onnx_value.shape == torch_value.shape, what
    diff = float(np.abs(onnx_value - torch_value).max())
    assert diff <= ATOL, f"{what}: max|diff| {diff}"


@pytest.fixture(scope="module", params=FAMILIES)
def family_export(request, exported_tiny):
    family = request.param
    return family, exported_tiny(family), exporters.build_tiny(family)


def test_manifest_lists_every_component_validated(family_export):
    family, folder, _ = family_export
    manifest = manifest_io.read(folder)  # also checks every file exists with the recorded size
    data = manifest.data
    assert data["model_id"] is None and data["source"] == f"tiny:{family}" and data["random_weights"] is True
    assert data["family"] == exporters.TINY_SOURCES[family][0]
    assert data["opset"] == 17 and data["precision"] == "fp32" and data["exporter"] == "optimum"
    assert set(data["components"]) == set(CONTRACT[family])
    for name, entry in data["components"].items():
        assert entry["path"] == f"{name}/model.onnx"
        assert entry["sha256"] == manifest_io.sha256_of(folder / entry["path"])
        assert entry["params"] > 0
        check = entry["validation"]
        assert 0 <= check["max_abs_diff"] <= check["tolerance"], name
        assert len(check["shapes"]) == 2 and check["shapes"][0] != check["shapes"][1]
        assert (folder / name / "config.json").is_file()
    for key in ("torch", "diffusers", "transformers", "onnx", "onnxruntime"):
        assert data["versions"][key]
    assert data["created"].endswith("Z")
    assert not list(folder.parent.glob(f".{folder.name}.tmp-*"))


def test_graph_names_follow_the_contract(family_export):
    family, folder, _ = family_export
    for name, (inputs, outputs) in CONTRACT[family].items():
        sess = session(folder / name / "model.onnx")
        assert {a.name for a in sess.get_inputs()} == inputs, name
        assert {a.name for a in sess.get_outputs()} == outputs, name
        types = {a.name: a.type for a in sess.get_inputs()}
        if "input_ids" in types:
            assert types["input_ids"] == "tensor(int64)"
        if "timestep" in types:
            shape = next(a.shape for a in sess.get_inputs() if a.name == "timestep")
            assert types["timestep"] == "tensor(float)"
            assert len(shape) == (0 if name == "unet" else 1)


def test_config_has_what_the_engine_needs(family_export):
    family, folder, pipe = family_export
    config = manifest_io.read(folder).config
    for key, value in CONFIG[family].items():
        assert config[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    assert config["vae_scale_factor"] == 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    mirrored = registry.get(exporters.TINY_SOURCES[family][1]).scheduler
    assert manifest_io.read(folder).data["scheduler_source"] == "checkpoint"  # no --model: the pipeline's own
    assert scheduler["_class_name"] == mirrored["_class_name"] == config["scheduler_class"]
    assert "_use_default_values" not in scheduler
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == exporters.TINY_SOURCES[family][2]


def test_tokenizers_are_saved_fast_and_slow(family_export):
    family, folder, pipe = family_export
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        reference = getattr(pipe, name, None)
        if reference is None:
            assert not (folder / name).exists()
            continue
        assert (folder / name / "tokenizer_config.json").is_file()
        fast = tokenizers.Tokenizer.from_file(str(folder / name / "tokenizer.json"))
        for prompt in ("a photo of an astronaut riding a horse on Mars", "Ünïcode, 42 cats!"):
            assert fast.encode(prompt).ids == reference(prompt).input_ids, (name, prompt)
        config = json.loads((folder / name / "tokenizer_config.json").read_text())
        if type(reference).__name__.startswith("CLIPTokenizer"):
            assert (folder / name / "vocab.json").is_file() and (folder / name / "merges.txt").is_file()
            assert len(json.loads((folder / name / "vocab.json").read_text())) == 49408
            assert config["model_max_length"] == 77
            second_clip = name == "tokenizer_2" and family in ("sdxl", "sd3")
            assert config["pad_token"] == ("!" if second_clip else "<|endoftext|>")
        else:
            assert config["pad_token"] == "<pad>" and config["eos_token"] == "</s>"


def test_text_encoders_match_pytorch(family_export):
    family, folder, pipe = family_export
    prompts = ["a photo of an astronaut riding a horse on Mars", "a red apple"]
    for name in CONTRACT[family]:
        if not name.startswith("text_encoder"):
            continue
        module = getattr(pipe, name)
        tokenizer = getattr(pipe, name.replace("text_encoder", "tokenizer"))
        sess = session(folder / name / "model.onnx")
        for batch, length in ((prompts[:1], 77), (prompts, 20)):
            ids = tokenizer(batch, padding="max_length", max_length=length, truncation=True, return_tensors="np")
            ids = ids.input_ids.astype(np.int64)
            got = run(sess, {"input_ids": ids})
            with torch.no_grad():
                out = module(torch.from_numpy(ids), output_hidden_states=True)
            close(got["last_hidden_state"], out.last_hidden_state, f"{name} last_hidden_state")
            if "pooler_output" in got:
                close(got["pooler_output"], out.pooler_output, f"{name} pooler_output")
            if "text_embeds" in got:
                close(got["text_embeds"], out.text_embeds, f"{name} text_embeds")
            for i, hidden in enumerate(out.hidden_states if "hidden_states.0" in got else ()):
                close(got[f"hidden_states.{i}"], hidden, f"{name} hidden_states.{i}")


def test_denoiser_matches_pytorch(family_export):
    family, folder, pipe = family_export
    rng = np.random.default_rng(0)
    name = "unet" if "unet" in CONTRACT[family] else "transformer"
    sess = session(folder / name / "model.onnx")
    module = getattr(pipe, name)
    cfg = module.config
    for batch, h, w in SHAPES:
        if name == "unet":
            feeds = {
                "sample": rng.standard_normal((batch, 4, h, w), dtype=np.float32),
                "timestep": np.array(421.0, dtype=np.float32),
                "encoder_hidden_states": rng.standard_normal((batch, 77, cfg.cross_attention_dim), dtype=np.float32),
            }
            kwargs = {}
            if family == "sdxl":
                feeds["text_embeds"] = rng.standard_normal((batch, 32), dtype=np.float32)
                feeds["time_ids"] = np.tile(np.array([[2 * h, 2 * w, 0, 0, 2 * h, 2 * w]], np.float32), (batch, 1))
                kwargs["added_cond_kwargs"] = {k: torch.from_numpy(feeds[k]) for k in ("text_embeds", "time_ids")}
            if family == "lcm":
                feeds["timestep_cond"] = rng.standard_normal((batch, 32), dtype=np.float32)
                kwargs["timestep_cond"] = torch.from_numpy(feeds["timestep_cond"])
            with torch.no_grad():
                expected = module(
                    torch.from_numpy(feeds["sample"]),
                    torch.tensor(421.0),
                    encoder_hidden_states=torch.from_numpy(feeds["encoder_hidden_states"]),
                    **kwargs,
                ).sample
            close(run(sess, feeds)["out_sample"], expected, f"unet at {(batch, h, w)}")
        elif family == "sd3":
            feeds = {
                "hidden_states": rng.standard_normal((batch, 16, h, w), dtype=np.float32),
                "encoder_hidden_states": rng.standard_normal((batch, 77 + 33, 64), dtype=np.float32),
                "pooled_projections": rng.standard_normal((batch, 64), dtype=np.float32),
                "timestep": np.full((batch,), 640.0, dtype=np.float32),
            }
            with torch.no_grad():
                expected = module(**{k: torch.from_numpy(v) for k, v in feeds.items()}).sample
            close(run(sess, feeds)["out_hidden_states"], expected, f"sd3 transformer at {(batch, h, w)}")
        else:  # FLUX: packed 2x2 latents, ids as FluxPipeline makes them
            seq = (h // 2) * (w // 2)
            img_ids = torch.zeros(h // 2, w // 2, 3)
            img_ids[..., 1] += torch.arange(h // 2)[:, None]
            img_ids[..., 2] += torch.arange(w // 2)[None, :]
            feeds = {
                "hidden_states": rng.standard_normal((batch, seq, 64), dtype=np.float32),
                "encoder_hidden_states": rng.standard_normal((batch, 40, 64), dtype=np.float32),
                "pooled_projections": rng.standard_normal((batch, 32), dtype=np.float32),
                "timestep": np.full((batch,), 0.7, dtype=np.float32),
                "img_ids": img_ids.reshape(seq, 3).numpy(),
                "txt_ids": np.zeros((40, 3), dtype=np.float32),
                "guidance": np.full((batch,), 3.5, dtype=np.float32),
            }
            with torch.no_grad():
                expected = module(**{k: torch.from_numpy(v) for k, v in feeds.items()}).sample
            close(run(sess, feeds)["out_hidden_states"], expected, f"flux transformer at {(batch, h, w)}")


def test_vae_matches_pytorch(family_export):
    family, folder, pipe = family_export
    rng = np.random.default_rng(1)
    decoder = session(folder / "vae_decoder" / "model.onnx")
    encoder = session(folder / "vae_encoder" / "model.onnx")
    channels = pipe.vae.config.latent_channels
    for batch, h, w in SHAPES:
        latents = rng.standard_normal((batch, channels, h, w), dtype=np.float32)
        with torch.no_grad():
            expected = pipe.vae.decode(torch.from_numpy(latents)).sample
        close(run(decoder, {"latent_sample": latents})["sample"], expected, f"vae_decoder at {(batch, h, w)}")
        image = rng.uniform(-1, 1, (batch, 3, 2 * h, 2 * w)).astype(np.float32)
        with torch.no_grad():
            expected = pipe.vae.encode(torch.from_numpy(image)).latent_dist.parameters
        close(run(encoder, {"sample": image})["latent_parameters"], expected, f"vae_encoder at {(batch, h, w)}")


BLOCK_OPTIMUM = """
import sys
sys.modules["optimum"] = None  # as if not installed: `import optimum` fails, find_spec says None
import exporters
exporters.export("tiny:sd15", out=sys.argv[1], progress=None)
assert not any(m.startswith("optimum.") for m in sys.modules)
"""


def test_torch_onnx_path_without_optimum_gives_the_same_graphs(tmp_path, exported_tiny):
    """optimum unimportable: export falls back to torch.onnx, with the same names, dtypes and numbers."""
    out = tmp_path / "sd15-torch"
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_OPTIMUM, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    torch_manifest = manifest_io.read(out)
    optimum_manifest = manifest_io.read(exported_tiny("sd15"))
    assert torch_manifest.data["exporter"] == "torch.onnx"
    assert set(torch_manifest.components) == set(optimum_manifest.components)
    for name, entry in torch_manifest.components.items():
        other = optimum_manifest.components[name]
        for side in ("inputs", "outputs"):
            assert set(entry[side]) == set(other[side]), (name, side)
            for arg, spec in entry[side].items():
                assert spec["dtype"] == other[side][arg]["dtype"], (name, arg)
                assert len(spec["shape"]) == len(other[side][arg]["shape"]), (name, arg)
        assert entry["validation"]["max_abs_diff"] <= entry["validation"]["tolerance"]
        # same weights, same graph semantics: both graphs agree on an input neither was traced with
        a, b = session(out / entry["path"]), session(optimum_manifest.component_path(name))
        rng = np.random.default_rng(5)
        feeds = {}
        for arg in a.get_inputs():
            shape = [
                {"batch_size": 1, "sequence_length": 77}.get(d, 24) if isinstance(d, str) else d for d in arg.shape
            ]
            if arg.type == "tensor(int64)":
                feeds[arg.name] = rng.integers(0, 1000, size=shape).astype(np.int64)
            else:
                feeds[arg.name] = rng.standard_normal(shape).astype(np.float32)
        got_a, got_b = run(a, feeds), run(b, feeds)
        for key in got_a:
            assert np.abs(got_a[key] - got_b[key]).max() <= ATOL, (name, key)
