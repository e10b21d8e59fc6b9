"""Optimum's own ONNX exports load without a stepwise.json: the manifest is derived (registry/derive.py).

The exports are made here as a user makes them: a tiny diffusers pipeline saved with ``save_pretrained`` and
exported by optimum's ``main_export(..., task="text-to-image")`` (what ``optimum-cli export onnx --task
text-to-image`` runs). The engine's image of such a folder is compared with diffusers' pipeline on the same
weights and initial latents (within 2/255, as tests/test_engine_parity.py), the derived ``config`` with the
one ``stepwise export`` computes from the PyTorch modules, the graph reader with the ``onnx`` package, and the
tokenizer built from CLIP's slow files with transformers' fast tokenizer.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from registry import derive, manifest
from registry.manifest import ManifestError
from registry.onnx_graph import OnnxFormatError, read_interface

ROOT = Path(__file__).resolve().parents[1]
MAX_PIXEL_DIFF = 2  # out of 255, per channel
SEED = 1234
PROMPT = "a red apple on a table"
# tiny pipeline: (steps, guidance, width, height); the flow transformers at a non-square size
CASES = {
    "sd15": (3, 7.5, 64, 64),
    "sdxl": (3, 5.0, 64, 64),
    "lcm": (4, 8.0, 64, 64),
    "sd3": (3, 7.0, 64, 48),
    "flux-schnell": (3, 0.0, 64, 48),
    "flux-dev": (3, 3.5, 64, 48),
}
FAMILIES = {"sd15": "sd15", "sdxl": "sdxl", "lcm": "sd15", "sd3": "sd3", "flux-schnell": "flux", "flux-dev": "flux"}


def stepwise(*args, cwd=ROOT):
    env = {**os.environ, "STEPWISE_GRAPH_CACHE": "0", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300
    )


def assert_one_line_error(out, *needles):
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="session")
def optimum_export(tmp_path_factory):
    """``optimum_export(name)`` → the folder optimum's exporter writes for ``tiny.build(name)``, once per
    session. Read-only for tests: use ``copy_of``."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("optimum.exporters.onnx")
    from optimum.exporters.onnx import main_export

    from exporters import backends, tiny

    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            root = tmp_path_factory.mktemp(f"optimum-{name}")
            tiny.build(name).save_pretrained(root / "diffusers")
            with backends.quiet():
                main_export(model_name_or_path=str(root / "diffusers"), output=str(root / "onnx"), task="text-to-image")
            made[name] = root / "onnx"
        return made[name]

    return get


def copy_of(folder: Path, tmp_path: Path, name: str = "model") -> Path:
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


# --- what optimum writes, and the engine's image of it --------------------------------------------------


@pytest.mark.slow
def test_what_optimum_writes(optimum_export):
    """The differences from a Stepwise export the derivation handles (docs/design.md, 'Bringing an optimum
    export'): no manifest, CLIP tokenizers as slow files only, hidden_states.N only where SDXL/SD3 need them."""
    sd15, sdxl = optimum_export("sd15"), optimum_export("sdxl")
    for folder in (sd15, sdxl):
        assert not (folder / "stepwise.json").exists()
        assert not (folder / "tokenizer" / "tokenizer.json").exists()
        assert (folder / "tokenizer" / "vocab.json").is_file() and (folder / "tokenizer" / "merges.txt").is_file()
    assert read_interface(sd15 / "unet" / "model.onnx").input("timestep").shape == []  # a float scalar
    assert not any(
        o.startswith("hidden_states.") for o in read_interface(sd15 / "text_encoder" / "model.onnx").output_names
    )
    te2 = read_interface(sdxl / "text_encoder_2" / "model.onnx").output_names
    assert "text_embeds" in te2 and "hidden_states.3" in te2  # SDXL's penultimate states and pooled projection


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_optimum_export_matches_diffusers(optimum_export, tmp_path, monkeypatch, name):
    import diffusers
    import torch

    import engine
    from exporters import tiny
    from tests.test_engine_parity import numpy_randn_patch

    steps, guidance, width, height = CASES[name]
    folder = copy_of(optimum_export(name), tmp_path)
    pipe = engine.load_pipeline(folder, threads=1)
    assert pipe.manifest.data["source"] == "optimum" and pipe.manifest.data["derived"] is True
    noise = np.random.default_rng(7).standard_normal(pipe.family.latent_shape(width, height), dtype=np.float32)
    ours = pipe.generate(
        prompt=PROMPT, steps=steps, guidance=guidance, width=width, height=height, seed=SEED, latents=noise
    ).image

    reference = tiny.build(name)  # the same weights, and the scheduler config the export carries
    latents = torch.from_numpy(noise.copy())
    kwargs = {}
    if name == "lcm":
        numpy_randn_patch(monkeypatch, "diffusers.schedulers.scheduling_lcm", SEED)
    if name.startswith("flux"):
        latents = diffusers.FluxPipeline._pack_latents(latents, *noise.shape)
    if FAMILIES[name] in ("sd3", "flux"):
        kwargs["max_sequence_length"] = pipe.manifest.config["max_sequence_length"]
    with torch.no_grad():
        expected = reference(
            PROMPT,
            num_inference_steps=steps,
            guidance_scale=guidance,
            width=width,
            height=height,
            latents=latents,
            output_type="np",
            **kwargs,
        ).images[0]
    expected = (expected * 255).round().astype(np.uint8)
    assert ours.shape == expected.shape == (height, width, 3)
    diff = np.abs(ours.astype(int) - expected.astype(int)).max()
    assert diff <= MAX_PIXEL_DIFF, f"max pixel difference {diff}/255"
    assert expected.std() > 5  # a flat image would match anything flat


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_derived_config_is_what_stepwise_export_records(optimum_export, tmp_path, name):
    """From the JSON files and the graphs, the same ``config`` the exporter computes from the PyTorch modules."""
    from exporters import tiny
    from exporters.main import pipeline_config

    derived = manifest.read(copy_of(optimum_export(name), tmp_path))
    pipeline = tiny.build(name)
    scheduler = json.loads(pipeline.scheduler.to_json_string())
    assert derived.config == pipeline_config(pipeline, FAMILIES[name], scheduler)
    assert derived.family == FAMILIES[name]


# --- the derived manifest: written once, reused, kept in memory when the folder is read-only --------------


@pytest.mark.slow
def test_manifest_is_written_beside_the_graphs_and_reused(optimum_export, tmp_path, monkeypatch):
    import engine

    folder = copy_of(optimum_export("sd15"), tmp_path)
    engine.load_pipeline(folder, threads=1)
    written = folder / "stepwise.json"
    data = json.loads(written.read_text())
    assert data["format"] == manifest.FORMAT and data["source"] == "optimum" and data["derived"] is True
    assert set(data["components"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    for entry in data["components"].values():
        path = folder / entry["path"]
        assert entry["bytes"] == path.stat().st_size and entry["sha256"] == manifest.sha256_of(path)
    assert not list(folder.glob(".stepwise.json*"))  # the temporary file was renamed, not left behind

    # later loads read the file: nothing is derived again, the file is not rewritten
    before = written.stat().st_mtime_ns
    derive._MEMORY.clear()
    monkeypatch.setattr(derive, "derive", lambda folder: pytest.fail("derived again"))
    pipe = engine.load_pipeline(folder, threads=1)
    assert pipe.manifest.data == data and written.stat().st_mtime_ns == before


@pytest.mark.slow
def test_a_derived_manifest_follows_the_graphs(optimum_export, tmp_path):
    """Graphs replaced or removed since: the derived manifest (not an export's) is derived again."""
    folder = copy_of(optimum_export("sd15"), tmp_path)
    assert "vae_encoder" in manifest.read(folder).components
    shutil.rmtree(folder / "vae_encoder")
    again = manifest.read(folder)
    assert "vae_encoder" not in again.components
    assert "vae_encoder" not in json.loads((folder / "stepwise.json").read_text())["components"]


@pytest.fixture
def read_only(monkeypatch):
    """Make folders read-only; as root (whom permissions do not stop) writes also fail as they would."""
    made = []

    def apply(folder: Path) -> Path:
        for path in [folder, *folder.rglob("*")]:
            if path.is_dir():
                path.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
                made.append(path)
        if os.geteuid() == 0:

            def refuse(folder, data):
                raise PermissionError(13, "Permission denied", str(folder))

            monkeypatch.setattr(derive, "write", refuse)
        return folder

    yield apply
    for path in made:
        path.chmod(stat.S_IRWXU)


@pytest.mark.slow
def test_a_read_only_folder_still_loads(optimum_export, tmp_path, read_only, caplog):
    import engine

    writable = copy_of(optimum_export("sd15"), tmp_path, "writable")
    folder = read_only(copy_of(optimum_export("sd15"), tmp_path, "read-only"))
    derive._MEMORY.clear()
    options = dict(prompt=PROMPT, steps=2, guidance=7.5, width=64, height=64, seed=0)
    with caplog.at_level(logging.DEBUG):
        image = engine.load_pipeline(folder, threads=1).generate(**options).image
        again = manifest.read(folder)  # from memory: the folder did not change
    assert not (folder / "stepwise.json").exists()
    assert again.data["derived"] is True
    assert [r for r in caplog.records if r.levelno > logging.DEBUG] == []
    assert any("kept in memory" in r.getMessage() for r in caplog.records)
    expected = engine.load_pipeline(writable, threads=1).generate(**options).image
    assert np.array_equal(image, expected)


# --- the command line and the one-line errors ------------------------------------------------------------


@pytest.mark.slow
def test_generate_with_an_optimum_folder(optimum_export, tmp_path):
    folder = copy_of(optimum_export("sd15"), tmp_path)
    out = stepwise(
        "generate", PROMPT, "--model", str(folder), "--steps", "20", "--seed", "1", "--out", str(tmp_path / "a.png")
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "a.png").is_file() and (folder / "stepwise.json").is_file()


@pytest.mark.slow
def test_sdxl_text_encoder_without_hidden_states_is_one_line(optimum_export, tmp_path):
    """An SDXL export whose text encoder lacks the penultimate states (as optimum writes SD 1.5's) is refused
    before anything is loaded, naming the output and the fix."""
    onnx = pytest.importorskip("onnx")
    folder = copy_of(optimum_export("sdxl"), tmp_path)
    path = folder / "text_encoder_2" / "model.onnx"
    model = onnx.load(str(path))
    kept = [o for o in model.graph.output if not o.name.startswith("hidden_states.")]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    onnx.save(model, str(path))
    with pytest.raises(ManifestError, match=r"text_encoder_2/model.onnx does not output .*hidden_states\.N") as err:
        manifest.read(folder)
    assert "\n" not in str(err.value) and "re-export" in str(err.value)
    out = stepwise("generate", PROMPT, "--model", str(folder), "--steps", "30")
    assert_one_line_error(out, "hidden_states.N", "re-export")
    assert not (folder / "stepwise.json").exists()


@pytest.mark.slow
def test_a_tokenizer_without_tokenizer_json_that_is_not_clip_is_one_line(optimum_export, tmp_path):
    folder = copy_of(optimum_export("sd15"), tmp_path)
    tok = folder / "tokenizer"
    (tok / "vocab.json").unlink()
    (tok / "merges.txt").unlink()
    (tok / "spiece.model").write_bytes(b"\x00")
    out = stepwise("generate", PROMPT, "--model", str(folder), "--steps", "20")
    assert_one_line_error(out, "has no tokenizer.json", "AutoTokenizer", "save_pretrained")


@pytest.mark.slow
def test_export_does_not_overwrite_an_optimum_folder(optimum_export, tmp_path):
    import exporters

    folder = copy_of(optimum_export("sd15"), tmp_path)
    manifest.read(folder)  # derived and written
    with pytest.raises(exporters.ExportError, match="Stepwise did not write"):
        exporters.export("tiny:sd15", out=folder, progress=None)
    assert (folder / "unet" / "model.onnx").is_file()


def test_a_folder_with_neither_manifest_nor_model_index_gets_todays_error(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ManifestError, match="has no stepwise.json: it is not a complete Stepwise export"):
        manifest.read(tmp_path)
    out = stepwise("generate", PROMPT, "--model", str(tmp_path), "--steps", "20")
    assert_one_line_error(out, "has no stepwise.json", "stepwise export")


def test_a_diffusers_checkpoint_and_an_unknown_pipeline_are_one_line(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    out = stepwise("generate", PROMPT, "--model", str(tmp_path), "--steps", "20")
    assert_one_line_error(out, "no ONNX graphs", "diffusers checkpoint", "stepwise export")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionUpscalePipeline"}))
    with pytest.raises(ManifestError, match="StableDiffusionUpscalePipeline.*cannot run; bring an export of one of"):
        manifest.read(tmp_path)
    assert not (tmp_path / "stepwise.json").exists()


# --- the pieces: the graph reader and the tokenizer conversion -------------------------------------------


def test_graph_interface_matches_the_onnx_package(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y0"]),
            helper.make_node("Mul", ["y0", "t"], ["y1"]),
            helper.make_node("Cast", ["y1"], ["out"], to=TensorProto.FLOAT16),
            helper.make_node("Identity", ["ids"], ["ids_out"]),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 4]),
            helper.make_tensor_value_info("t", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["seq", 3]),
        ],
        [
            helper.make_tensor_value_info("out", TensorProto.FLOAT16, ["batch", 3, 4]),
            helper.make_tensor_value_info("ids_out", TensorProto.INT64, None),
        ],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="model.onnx_data", size_threshold=0)

    found = read_interface(path)
    reference = onnx.load(str(path), load_external_data=False)

    def described(values):  # the onnx package's reading, in read_interface's terms
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = None
            if t.HasField("shape"):
                dims = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim]
            out.append((v.name, helper.tensor_dtype_to_np_dtype(t.elem_type).name, dims))
        return out

    numpy_names = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(float16)": "float16"}
    assert [(v.name, numpy_names[v.type], v.shape) for v in found.inputs] == described(reference.graph.input)
    assert [(v.name, numpy_names[v.type], v.shape) for v in found.outputs] == described(reference.graph.output)
    assert found.opset == 17 and found.producer == "test" and found.external_data == {"model.onnx_data"}

    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 64)
    with pytest.raises(OnnxFormatError, match="not a readable ONNX model"):
        read_interface(tmp_path / "junk.onnx")


PROMPTS = [
    PROMPT,
    "Hello, World!! hello!",
    "  spaces   and\ttabs\n",
    "naïve café Ünïcödé 東京 🍎",
    "it's <|endoftext|> <|startoftext|>weird",
    "12345 numbers 3.14, (parens) [b] #tag @at $$$",
    "don't they'll we've I'M",
    "a long prompt " * 40,
    "",
]


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
@pytest.mark.parametrize("old_config", [False, True])
def test_clip_slow_files_tokenize_as_transformers_fast_tokenizer(tmp_path, pad, old_config):
    """What optimum writes for a CLIP tokenizer (vocab.json + merges.txt), converted with `tokenizers` alone,
    gives the ids of transformers' CLIPTokenizerFast (what `stepwise export` saves as tokenizer.json)."""
    pytest.importorskip("transformers")
    from transformers import CLIPTokenizerFast

    from engine.tokenize import PromptTokenizer
    from exporters.vocab import clip_tokenizer

    clip_tokenizer(pad_token=pad).save_pretrained(str(tmp_path))
    (tmp_path / "tokenizer.json").unlink(missing_ok=True)
    if old_config:  # configs of older transformers have no added_tokens_decoder
        config = json.loads((tmp_path / "tokenizer_config.json").read_text())
        config.pop("added_tokens_decoder", None)
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = PromptTokenizer(tmp_path)
    fast = CLIPTokenizerFast.from_pretrained(str(tmp_path))
    assert not (tmp_path / "tokenizer.json").exists()
    for prompt in PROMPTS:
        expected = fast(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        got = ours(prompt)
        assert got.ids[0].tolist() == expected, prompt
        assert got.truncated == (len(fast(prompt).input_ids) > 77)
