"""DeepFloyd IF, end to end on tiny:deepfloyd-if: the cascade export, the engine against diffusers' IFPipeline →
IFSuperResolutionPipeline → StableDiffusionUpscalePipeline chain from the same seeded noise, and the CLI's policy.

The reference is diffusers' own pipelines over the very modules the export came from (``build_cascade`` is
seeded): stage I with ``output_type="pt"``, its image handed to stage II, both fed the prompt states of
``stage_1.encode_prompt`` (as diffusers' IF docs chain them; ``clean_caption=False``, as bs4/ftfy are absent).
``randn_tensor`` is patched in both pipeline modules and DDPM's with ONE numpy generator seeded as the engine's,
and the draws are recorded and checked against the order the engine follows: stage I's noise and its steps'
variance noise, then stage II's noise, the noise of the upscaled image, its steps' variance noise; then stage
III (the x4 upscaler, called as diffusers' IF docs call it: ``prompt=``, stage II's ``pt`` image,
``noise_level=100``): the noise of its input image, its latents (DDIM at eta 0 draws nothing more).
The export without stage III (the default) is run end to end through the CLI against the chain's stage II.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import engine  # noqa: E402
from engine.families.deepfloyd_if import guided_noise, to_uint8, upscale_bilinear, upscaler_image  # noqa: E402
from exporters.deepfloyd_if import build_cascade  # noqa: E402
from exporters.deepfloyd_if.tiny import build_stage_3  # noqa: E402

MAX_PIXEL_DIFF = 2  # out of 255, per channel
SEED = 7
PROMPT = "A Red apple on a table "
RANDN_MODULES = (
    "diffusers.pipelines.deepfloyd_if.pipeline_if",
    "diffusers.pipelines.deepfloyd_if.pipeline_if_superresolution",
    "diffusers.schedulers.scheduling_ddpm",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_upscale",
    "diffusers.schedulers.scheduling_ddim",
)


@pytest.fixture(scope="module")
def exported(exported_tiny):
    """The whole cascade: stages I, II and (``--stage-3`` alone) the tiny x4 upscaler."""
    return exported_tiny("deepfloyd-if", stage_3="")


@pytest.fixture(scope="module")
def exported_1_2(exported, tmp_path_factory):
    """``tiny:deepfloyd-if`` as exported without ``--stage-3`` (what ``export --model deepfloyd-if`` writes): the
    exporter's own run (its stages' configs, schedulers, tokenizer, manifest, commit), with each graph's trace
    and validation replaced by a copy of the same graph from ``exported``: the same seeded builds, so the same
    graphs, and ~90 s of tracing saved."""
    import shutil

    import exporters
    import exporters.main
    from exporters import components
    from registry import manifest

    whole = manifest.read(exported)

    def copied_components(pipeline, backend, folder, opset, say, rewrite, src, cache_graphs=False, only=None):
        stage = "_2" if folder.name == "stage_2" else ""
        entries = {}
        for name in components.component_names(pipeline):
            if only is None or name in only:
                entry = dict(whole.components[name + stage])
                shutil.copytree(exported / Path(entry["path"]).parent, folder / name, dirs_exist_ok=True)
                for key in ("path", "data_path"):
                    if entry.get(key) and stage:
                        entry[key] = entry[key].removeprefix("stage_2/")
                entries[name] = entry
        return entries

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(exporters.main, "_export_components", copied_components)
        out = tmp_path_factory.mktemp("if-1-2") / "deepfloyd-if"
        return exporters.export("tiny:deepfloyd-if", out=out, progress=None)


@pytest.fixture(scope="module")
def chain():
    """diffusers' chain at 4, 3 and 3 steps (stage I's guidance 7.0, the empty negative prompt): (stage II's
    picture, stage III's picture, the shapes drawn)."""
    with pytest.MonkeyPatch.context() as patch:
        return reference(patch, 4, 3, 7.0, 3)


@pytest.fixture(scope="module")
def pipe(exported):
    """The loaded cascade, shared: a CascadePipeline holds no per-request state."""
    return engine.load_pipeline(exported)


def reference(monkeypatch, steps: int, steps_2: int, guidance: float, steps_3: int, negative: str | None = None):
    """(stage II's picture, stage III's picture, the shapes drawn) from diffusers' chain."""
    rng = np.random.default_rng(SEED)
    draws = []

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        shape = tuple(int(s) for s in shape)
        draws.append(shape)
        return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))

    for name in RANDN_MODULES:
        monkeypatch.setattr(importlib.import_module(name), "randn_tensor", randn_tensor)
    stage_1, stage_2 = build_cascade()
    embeds, negative_embeds = stage_1.encode_prompt(PROMPT, negative_prompt=negative, clean_caption=False)
    kwargs = {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds, "output_type": "pt"}
    image = stage_1(num_inference_steps=steps, guidance_scale=guidance, **kwargs).images
    out = stage_2(image=image, num_inference_steps=steps_2, **kwargs).images
    picture_2 = ((out / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    stage_3 = build_stage_3()
    with pytest.warns(FutureWarning, match=r"range in \[-1,1\]"):  # stage II's raw sample, kept as it is
        final = stage_3(
            prompt=PROMPT, image=out, noise_level=100, num_inference_steps=steps_3, negative_prompt=negative
        ).images[0]
    return picture_2, np.asarray(final), draws


def test_export_names_the_stages(exported):
    from registry import manifest

    found = manifest.read(exported)
    stage_3_graphs = {"text_encoder_3", "unet_3", "vae_decoder_3"}
    assert set(found.components) == {"text_encoder", "unet", "unet_2", *stage_3_graphs}
    assert found.components["unet_2"]["path"] == "stage_2/unet/model.onnx"
    assert found.components["vae_decoder_3"]["path"] == "stage_3/vae_decoder/model.onnx"
    assert "attention_mask" in found.components["text_encoder"]["inputs"]
    assert "attention_mask" not in found.components["text_encoder_3"]["inputs"]  # the upscaler's CLIP takes none
    assert "class_labels" in found.components["unet_2"]["inputs"]
    assert "class_labels" in found.components["unet_3"]["inputs"]
    first, second, third = found.config["stages"]
    assert (first["unet"], second["unet"], third["unet"]) == ("unet", "unet_2", "unet_3")
    assert (first["scheduler"], second["scheduler"]) == ("scheduler", "stage_2/scheduler")
    assert second["image_noising_scheduler"] == "stage_2/image_noising_scheduler" and second["noise_level"] == 250
    # StableDiffusionUpscalePipeline's defaults and diffusers' IF docs' noise level; the x4 VAE's constants
    assert (third["default_steps"], third["guidance"], third["noise_level"], third["max_noise_level"]) == (
        75,
        9,
        100,
        350,
    )
    assert (third["vae_scale_factor"], third["vae_scaling_factor"], third["in_channels"]) == (4, 0.08333, 7)

    def scheduler(folder):
        return json.loads((exported / folder / "scheduler_config.json").read_text())

    stage_1, stage_2 = build_cascade()  # what the export came from: its schedulers' configs, as saved
    stage_3 = build_stage_3()
    for folder, module in (
        ("scheduler", stage_1.scheduler),
        ("stage_2/scheduler", stage_2.scheduler),
        ("stage_2/image_noising_scheduler", stage_2.image_noising_scheduler),
        ("stage_3/scheduler", stage_3.scheduler),
        ("stage_3/low_res_scheduler", stage_3.low_res_scheduler),
    ):
        assert scheduler(folder) == json.loads(module.to_json_string())


def test_cascade_matches_diffusers(pipe, chain):
    """The empty negative prompt is the demanding case: its T5 states are nearly constant over the padding.
    Stage II's image is compared on its way (the callback's last stage II step), stage III's as the result."""
    steps, steps_2, steps_3 = 4, 3, 3
    expected_2, expected, draws = chain
    seen = []
    result = pipe.generate(
        prompt=PROMPT, steps=steps, guidance=7.0, seed=SEED, steps_2=steps_2, steps_3=steps_3, callback=seen.append
    )
    # leading timesteps end at t=0, which draws no variance noise: 1 + (steps - 1) draws, then 2 + (steps_2 - 1);
    # stage III: the input image's noise, then its latents
    assert draws == [(1, 3, 16, 16)] * steps + [(1, 3, 32, 32)] * (steps_2 + 1) + [(1, 3, 32, 32), (1, 4, 32, 32)]
    assert len(seen) == steps + steps_2 + steps_3
    for got, want, size in (
        (to_uint8(seen[steps + steps_2 - 1].latents), expected_2, 32),
        (result.image, expected, 128),
    ):
        assert got.shape == want.shape == (size, size, 3)
        assert want.std() > 20  # not a flat picture
        diff = np.abs(got.astype(int) - want.astype(int))
        assert diff.max() <= MAX_PIXEL_DIFF, f"{size}x{size}: max {diff.max()}/255, mean {diff.mean():.3f}"
    assert result.parameters["steps_2"] == 3 and result.parameters["guidance_2"] == 4.0
    assert (result.parameters["steps_3"], result.parameters["guidance_3"], result.parameters["noise_level_3"]) == (
        3,
        9.0,
        100,
    )
    assert [(s["stage"], s["steps"], s["size"]) for s in result.profile["stages"]] == [
        (1, steps, "16x16"),
        (2, steps_2, "32x32"),
        (3, steps_3, "128x128"),
    ]
    assert sum(row.get("stage") == 3 for row in result.profile["steps"]) == steps_3


def test_stages_1_2_export_generates_stage_2s_picture(exported_1_2, chain, tmp_path):
    """The export without stage III, end to end through the CLI: its PNG is stage II's picture (32x32 here) with
    no stage III parameters, against diffusers' IFPipeline -> IFSuperResolutionPipeline from the same noise."""
    import shutil

    from PIL import Image

    from registry import manifest
    from tests.test_generate import stepwise

    found = manifest.read(exported_1_2)
    assert set(found.components) == {"text_encoder", "unet", "unet_2"}
    assert [stage["stage"] for stage in found.config["stages"]] == [1, 2]
    assert set(found.data["sources"]) == {"stage_1", "stage_2"} and "denoiser_attention_3" not in found.config
    assert not (exported_1_2 / "stage_3").exists()
    (tmp_path / "models").mkdir()
    shutil.copytree(exported_1_2, tmp_path / "models" / "deepfloyd-if")
    args = ["--steps", "4", "--steps-2", "3", "--guidance", "7", "--seed", str(SEED), "--force", "--out", "if.png"]
    ran = stepwise(tmp_path, "generate", PROMPT, "--model", "deepfloyd-if", *args)
    assert ran.returncode == 0, ran.stderr
    assert "Stage II: 3 steps" in ran.stdout and "Stage III" not in ran.stdout
    with Image.open(tmp_path / "if.png") as png:
        got, metadata = np.asarray(png.convert("RGB")), dict(png.text)
    assert metadata["steps"] == "4" and metadata["steps_2"] == "3" and metadata["guidance_2"] == "4.0"
    assert not [key for key in metadata if key.endswith("_3")]
    expected_2 = chain[0]
    assert got.shape == expected_2.shape == (32, 32, 3)
    diff = np.abs(got.astype(int) - expected_2.astype(int))
    assert diff.max() <= MAX_PIXEL_DIFF, f"max {diff.max()}/255, mean {diff.mean():.3f}"


def test_serve_runs_each_stage_at_the_servers_steps(exported, exported_1_2, chain, tmp_path):
    """``serve --steps-2/--steps-3``: every request's stages II and III at the server's counts, judged by their
    policies with the request's force as generate judges them; a stage no request could run refused at start.
    The image against diffusers' chain at the same counts."""
    import base64
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from serve.app import create_app
    from serve.worker import ModelError

    for folder, options, message in (
        (exported_1_2, {"steps_3": 3}, "export lacks; drop it, or export with --stage-3"),
        (exported, {"steps_2": 0}, "--steps-2 must be at least 1"),
    ):
        with pytest.raises(ModelError, match=message):
            create_app([str(folder)], out_dir=tmp_path, preload=False, **options)
    app = create_app([str(exported)], out_dir=tmp_path, steps_2=3, steps_3=3)
    body = {"prompt": PROMPT, "steps": 4, "cfg_scale": 7.0, "seed": SEED, "force": True}
    with TestClient(app) as client:
        refused = client.post("/sdapi/v1/txt2img", json={**body, "steps": 50, "force": False})
        assert refused.status_code == 422 and "--steps-2 50" in refused.json()["detail"], refused.text
        answer = client.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    parameters = info["stepwise"]["parameters"][0]
    assert (parameters["steps"], parameters["steps_2"], parameters["steps_3"]) == (4, 3, 3)
    with Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))) as png:
        got = np.asarray(png.convert("RGB"))
    expected = chain[1]
    assert got.shape == expected.shape == (128, 128, 3)
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= MAX_PIXEL_DIFF, f"max {diff.max()}/255, mean {diff.mean():.3f}"


def test_batch_runs_each_line_at_its_stages_steps(exported, chain, tmp_path):
    """``stepwise batch``: a line's ``steps_2`` / ``steps_3`` are its stages' steps, judged by their policies as
    generate's --steps-2 / --steps-3 (the fix named as the line's key); the image against diffusers' chain."""
    from PIL import Image

    from tests.test_generate import stepwise

    line = {"prompt": PROMPT, "steps": 4, "steps_2": 3, "guidance": 7.0, "seed": SEED}
    (tmp_path / "refused.jsonl").write_text(json.dumps({**line, "steps": 50}) + "\n")  # stage I's default
    refused = stepwise(tmp_path, "batch", "refused.jsonl", "--model", str(exported), "--out", "no")
    assert refused.returncode == 2 and '"steps_2": 50' in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "no").exists()
    (tmp_path / "prompts.jsonl").write_text(json.dumps({**line, "steps_3": 3}) + "\n")
    args = ["--model", str(exported), "--out", "out", "--workers", "1", "--force"]
    ran = stepwise(tmp_path, "batch", "prompts.jsonl", *args)
    assert ran.returncode == 0, ran.stderr
    (entry,) = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert (entry["steps_2"], entry["steps_3"]) == (3, 3)
    with Image.open(tmp_path / "out" / entry["file"]) as png:
        got, metadata = np.asarray(png.convert("RGB")), dict(png.text)
    assert (metadata["steps_2"], metadata["steps_3"]) == ("3", "3")
    diff = np.abs(got.astype(int) - chain[1].astype(int))
    assert diff.max() <= MAX_PIXEL_DIFF, f"max {diff.max()}/255, mean {diff.mean():.3f}"


def test_upscale_is_torch_bilinear_align_corners():
    image = np.random.default_rng(0).standard_normal((1, 3, 16, 12), dtype=np.float32)
    for size in ((64, 48), (32, 40), (17, 5)):
        ref = torch.nn.functional.interpolate(torch.from_numpy(image), size, mode="bilinear", align_corners=True)
        assert np.abs(upscale_bilinear(image, *size) - ref.numpy()).max() < 2e-6


def test_stage_3_takes_stage_2s_tensor_as_vae_image_processor_does():
    """StableDiffusionUpscalePipeline's preprocess of a tensor: below 0 somewhere, kept as [-1, 1]; else [0, 1],
    mapped to [-1, 1]."""
    import warnings

    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=4, resample="bicubic")  # the upscale pipeline's
    rng = np.random.default_rng(2)
    for low in (-1.2, 0.0):
        image = rng.uniform(low, 1.0, size=(1, 3, 8, 12)).astype(np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "[-1,1] is deprecated": what IF's chain passes
            expected = processor.preprocess(torch.from_numpy(image)).numpy()
        assert np.abs(upscaler_image(image, 4) - expected).max() < 1e-6


def test_guidance_uses_the_text_branch_variance():
    out = np.random.default_rng(1).standard_normal((2, 6, 4, 4), dtype=np.float32)
    uncond, text = torch.from_numpy(out).chunk(2)
    noise_u, _ = uncond.split(3, dim=1)
    noise_t, variance = text.split(3, dim=1)
    expected = torch.cat([noise_u + 7.0 * (noise_t - noise_u), variance], dim=1).numpy()
    assert np.abs(guided_noise(out, 3, 7.0) - expected).max() < 1e-6


def test_cli_plans_fifty_refuses_ten_and_runs_the_cascade(exported, tmp_path):
    import shutil

    from PIL import Image

    from tests.test_generate import stepwise

    (tmp_path / "models").mkdir()
    shutil.copytree(exported, tmp_path / "models" / "deepfloyd-if")
    refused = stepwise(tmp_path, "generate", "a cat", "--model", "deepfloyd-if", "--steps", "10")
    lines = [line for line in refused.stderr.strip().splitlines() if line]
    assert refused.returncode == 2 and len(lines) == 1 and "at least 30" in lines[0] and "--steps 50" in lines[0]
    assert "Steps:    10" not in refused.stdout  # refused before the plan
    refused_2 = stepwise(tmp_path, "generate", "a cat", "--model", "deepfloyd-if", "--steps-2", "5")
    assert refused_2.returncode == 2 and "--steps-2 50" in refused_2.stderr and "Traceback" not in refused_2.stderr
    refused_3 = stepwise(tmp_path, "generate", "a cat", "--model", "deepfloyd-if", "--steps-3", "5")
    assert refused_3.returncode == 2 and "--steps-3 75" in refused_3.stderr and "Traceback" not in refused_3.stderr
    args = ["--steps", "3", "--steps-2", "2", "--steps-3", "2", "--force", "--seed", "1", "--out", "if.png"]
    ran = stepwise(tmp_path, "generate", "a cat", "--model", "deepfloyd-if", *args, "--profile")
    assert ran.returncode == 0, ran.stderr
    assert "Stage II: 2 steps" in ran.stdout and "stage 2 (32x32)" in ran.stdout
    assert "Stage III: 2 steps" in ran.stdout and "stage 3 (128x128)  2 steps" in ran.stdout
    measured = json.loads((tmp_path / "timings.json").read_text())  # each stage's time per step, for the plan
    assert any(k.startswith("deepfloyd-if#stage-2|16x16") for k in measured) and any(
        k.startswith("deepfloyd-if|16x16") for k in measured
    )
    assert any(k.startswith("deepfloyd-if#stage-3|16x16") for k in measured)
    with Image.open(tmp_path / "if.png") as png:
        assert png.size == (128, 128)
        assert png.text["steps"] == "3" and png.text["steps_2"] == "2" and png.text["guidance_2"] == "4.0"
        assert png.text["steps_3"] == "2" and png.text["guidance_3"] == "9.0" and png.text["noise_level_3"] == "100"


def test_default_plan_is_fifty_steps():
    import registry
    from registry import requests

    model = registry.get("deepfloyd-if")
    family = registry.family(model.family)
    plan = requests.plan_request(model, family, prompt="a cat")
    assert (plan.steps, plan.decision_2.steps, model.stage(2).guidance) == (50, 50, 4.0)
    assert plan.decision_3 is None  # an export without stage III
    with pytest.raises(requests.Refused):
        requests.plan_request(model, family, prompt="a cat", steps=10)
    # stage III: StableDiffusionUpscalePipeline's defaults
    plan = requests.plan_request(model, family, prompt="a cat", stage_3=True)
    assert (plan.decision_3.steps, model.stage(3).guidance, model.stage(3).hub_id) == (
        75,
        9.0,
        "stabilityai/stable-diffusion-x4-upscaler",
    )
    with pytest.raises(requests.Refused, match="--steps-3 75"):
        requests.plan_request(model, family, prompt="a cat", stage_3=True, steps_3=10)
    with pytest.raises(requests.InputError, match="export with --stage-3"):
        requests.plan_request(model, family, prompt="a cat", steps_3=50)


def test_export_refuses_a_cascade_it_cannot_build(tmp_path):
    """One line naming the fix, before any graph is exported: a later stage as SOURCE, no stage II, a stage in
    the wrong place, a tiny cascade's own stages given as folders, --stage-3 alone without a registry model."""
    import exporters

    stage_1, stage_2 = build_cascade()
    stage_1.save_pretrained(tmp_path / "stage1")
    stage_2.save_pretrained(tmp_path / "stage2")
    build_stage_3().save_pretrained(tmp_path / "stage3")
    cases = [
        (str(tmp_path / "stage2"), {}, "pass stage I (IFPipeline) as SOURCE"),
        (str(tmp_path / "stage1"), {}, "--stage-2 FOLDER_OR_REPO"),
        (str(tmp_path / "stage1"), {"stage_2": str(tmp_path / "stage1")}, "stage 2 of DeepFloyd IF is IFSuperRes"),
        (str(tmp_path / "stage3"), {}, "pass stage I (IFPipeline) as SOURCE and this one as --stage-3"),
        (
            str(tmp_path / "stage1"),
            {"stage_2": str(tmp_path / "stage2"), "stage_3": str(tmp_path / "stage2")},
            "stage 3 of DeepFloyd IF is StableDiffusionUpscalePipeline",
        ),
        (str(tmp_path / "stage1"), {"stage_2": str(tmp_path / "stage2"), "stage_3": ""}, "export with --model"),
        ("tiny:deepfloyd-if", {"stage_2": str(tmp_path / "stage2")}, "export it without --stage-2"),
        ("tiny:deepfloyd-if", {"stage_3": str(tmp_path / "stage3")}, "with --stage-3 alone (no folder)"),
        ("tiny:sd15", {"stage_2": str(tmp_path / "stage2")}, "is a sd15 model"),
    ]
    for source, options, message in cases:
        with pytest.raises(exporters.ExportError, match=message.replace("(", r"\(").replace(")", r"\)")):
            exporters.export(source, out=tmp_path / "out", progress=None, **options)
    assert not (tmp_path / "out").exists()


def test_stage_3_decodes_in_tiles_where_it_would_not_fit_otherwise(pipe):
    """The x4 VAE's mid-block attention grows with the square of the output's pixels (1024x1024: 65,536 tokens,
    16 GiB a score tensor): the plan decodes in tiles where nothing fits without them, and the tiles are
    diffusers' ``vae.enable_tiling()``: the exported decoder in tiles against the PyTorch VAE's tiled decode."""
    from engine.profile import Profiler
    from engine.vae import TiledDecoder

    untiled = pipe.plan_memory(64, 64, policy="resident", vae_tiling=False)  # a 512x512 decode
    tiled = pipe.plan_memory(64, 64, policy="resident", vae_tiling=True)
    assert tiled.need_mb < untiled.need_mb
    plan = pipe.plan_memory(64, 64, policy="resident", available_mb=(tiled.need_mb + untiled.need_mb) / 2)
    assert plan.vae_tiling and f"untiled ~{untiled.need_mb:,.0f} MB" in plan.describe()

    vae = build_stage_3().vae
    vae.enable_tiling()
    z = np.random.default_rng(3).standard_normal((1, 4, 48, 40), dtype=np.float32)  # 192x160: 128-pixel tiles
    with torch.no_grad():
        expected = vae.decode(torch.from_numpy(z)).sample.numpy()
    with pipe._phase("decode_3", Profiler()) as graphs:
        got = TiledDecoder(graphs["vae_decoder_3"], pipe._tiling_3()).decode(z)
    assert got.shape == expected.shape == (1, 3, 192, 160)
    assert np.abs(got - expected).max() < 1e-3
