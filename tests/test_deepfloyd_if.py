"""DeepFloyd IF, end to end on tiny:deepfloyd-if: the cascade export, the engine against diffusers' IFPipeline →
IFSuperResolutionPipeline chain from the same seeded noise, and the CLI's policy.

The reference is diffusers' own pipelines over the very modules the export came from (``build_cascade`` is
seeded): stage I with ``output_type="pt"``, its image handed to stage II, both fed the prompt states of
``stage_1.encode_prompt`` (as diffusers' IF docs chain them; ``clean_caption=False``, as bs4/ftfy are absent).
``randn_tensor`` is patched in both pipeline modules and DDPM's with ONE numpy generator seeded as the engine's,
and the draws are recorded and checked against the order the engine follows: stage I's noise and its steps'
variance noise, then stage II's noise, the noise of the upscaled image, its steps' variance noise.
"""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import engine  # noqa: E402
from engine.families.deepfloyd_if import guided_noise, upscale_bilinear  # noqa: E402
from exporters.deepfloyd_if import build_cascade  # noqa: E402

MAX_PIXEL_DIFF = 2  # out of 255, per channel
SEED = 7
PROMPT = "A Red apple on a table "
RANDN_MODULES = (
    "diffusers.pipelines.deepfloyd_if.pipeline_if",
    "diffusers.pipelines.deepfloyd_if.pipeline_if_superresolution",
    "diffusers.schedulers.scheduling_ddpm",
)


@pytest.fixture(scope="module")
def exported(exported_tiny):
    return exported_tiny("deepfloyd-if")


def reference(monkeypatch, steps: int, steps_2: int, guidance: float, negative: str | None = None):
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
    picture = ((out / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return picture, draws


def test_export_names_the_stages(exported):
    from registry import manifest

    found = manifest.read(exported)
    assert set(found.components) == {"text_encoder", "unet", "unet_2"}
    assert found.components["unet_2"]["path"] == "stage_2/unet/model.onnx"
    assert "attention_mask" in found.components["text_encoder"]["inputs"]
    assert "class_labels" in found.components["unet_2"]["inputs"]
    first, second = found.config["stages"]
    assert (first["unet"], second["unet"]) == ("unet", "unet_2")
    assert (first["scheduler"], second["scheduler"]) == ("scheduler", "stage_2/scheduler")
    assert second["image_noising_scheduler"] == "stage_2/image_noising_scheduler" and second["noise_level"] == 250

    def scheduler(folder):
        return json.loads((exported / folder / "scheduler_config.json").read_text())

    stage_1, stage_2 = build_cascade()  # what the export came from: its schedulers' configs, as saved
    for folder, module in (
        ("scheduler", stage_1.scheduler),
        ("stage_2/scheduler", stage_2.scheduler),
        ("stage_2/image_noising_scheduler", stage_2.image_noising_scheduler),
    ):
        assert scheduler(folder) == json.loads(module.to_json_string())


def test_cascade_matches_diffusers(exported, monkeypatch):
    """The empty negative prompt is the demanding case: its T5 states are nearly constant over the padding."""
    steps, steps_2 = 4, 3
    expected, draws = reference(monkeypatch, steps, steps_2, 7.0)
    pipe = engine.load_pipeline(exported)
    result = pipe.generate(prompt=PROMPT, steps=steps, guidance=7.0, seed=SEED, steps_2=steps_2)
    # leading timesteps end at t=0, which draws no variance noise: 1 + (steps - 1) draws, then 2 + (steps_2 - 1)
    assert draws == [(1, 3, 16, 16)] * steps + [(1, 3, 32, 32)] * (steps_2 + 1)
    assert result.image.shape == expected.shape == (32, 32, 3)
    assert expected.std() > 20  # not a flat picture
    diff = np.abs(result.image.astype(int) - expected.astype(int))
    assert diff.max() <= MAX_PIXEL_DIFF, f"max {diff.max()}/255, mean {diff.mean():.3f}"
    assert result.parameters["steps_2"] == 3 and result.parameters["guidance_2"] == 4.0
    assert [s["stage"] for s in result.profile["stages"]] == [1, 2]


def test_upscale_is_torch_bilinear_align_corners():
    image = np.random.default_rng(0).standard_normal((1, 3, 16, 12), dtype=np.float32)
    for size in ((64, 48), (32, 40), (17, 5)):
        ref = torch.nn.functional.interpolate(torch.from_numpy(image), size, mode="bilinear", align_corners=True)
        assert np.abs(upscale_bilinear(image, *size) - ref.numpy()).max() < 2e-6


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
    args = ["--steps", "3", "--steps-2", "2", "--force", "--seed", "1", "--out", "if.png", "--profile"]
    ran = stepwise(tmp_path, "generate", "a cat", "--model", "deepfloyd-if", *args)
    assert ran.returncode == 0, ran.stderr
    assert "Stage II: 2 steps" in ran.stdout and "stage 2 (32x32)" in ran.stdout
    measured = json.loads((tmp_path / "timings.json").read_text())  # each stage's time per step, for the plan
    assert any(k.startswith("deepfloyd-if#stage-2|16x16") for k in measured) and any(
        k.startswith("deepfloyd-if|16x16") for k in measured
    )
    with Image.open(tmp_path / "if.png") as png:
        assert png.size == (32, 32)
        assert png.text["steps"] == "3" and png.text["steps_2"] == "2" and png.text["guidance_2"] == "4.0"


def test_default_plan_is_fifty_steps():
    import registry
    from registry import requests

    model = registry.get("deepfloyd-if")
    plan = requests.plan_request(model, registry.family(model.family), prompt="a cat")
    assert (plan.steps, plan.decision_2.steps, model.stage(2).guidance) == (50, 50, 4.0)
    with pytest.raises(requests.Refused):
        requests.plan_request(model, registry.family(model.family), prompt="a cat", steps=10)


def test_export_refuses_a_cascade_it_cannot_build(tmp_path):
    """One line naming the fix, before any graph is exported: stage II as SOURCE, no stage II, stage III."""
    import exporters

    stage_1, stage_2 = build_cascade()
    stage_1.save_pretrained(tmp_path / "stage1")
    stage_2.save_pretrained(tmp_path / "stage2")
    cases = [
        (str(tmp_path / "stage2"), {}, "pass stage I (IFPipeline) as SOURCE"),
        (str(tmp_path / "stage1"), {}, "--stage-2 FOLDER_OR_REPO"),
        (str(tmp_path / "stage1"), {"stage_2": str(tmp_path / "stage1")}, "stage 2 of DeepFloyd IF is IFSuperRes"),
        (str(tmp_path / "stage1"), {"stage_2": str(tmp_path / "stage2"), "stage_3": "x"}, "not supported yet"),
        ("tiny:deepfloyd-if", {"stage_2": str(tmp_path / "stage2")}, "builds its own stage II"),
        ("tiny:sd15", {"stage_2": str(tmp_path / "stage2")}, "is a sd15 model"),
    ]
    for source, options, message in cases:
        with pytest.raises(exporters.ExportError, match=message.replace("(", r"\(").replace(")", r"\)")):
            exporters.export(source, out=tmp_path / "out", progress=None, **options)
    assert not (tmp_path / "out").exists()
