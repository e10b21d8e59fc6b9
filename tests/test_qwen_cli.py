"""`stepwise generate --model qwen-image` as a person runs it, on the tiny export in its default formats (int4
transformer and text encoder): the guide's 28 steps planned and run, 5 refused, --guidance as the true-CFG scale
with the " " negative prompt, the PNG's parameters."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from tests.test_generate import stepwise

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def home(tmp_path_factory, exported_tiny):
    home = tmp_path_factory.mktemp("home")
    (home / "models").mkdir()
    shutil.copytree(exported_tiny("qwen-image", model_id="qwen-image"), home / "models" / "qwen-image")
    return home


def test_generate_plans_the_guides_28_steps_and_runs(home):
    out = stepwise(
        home, "generate", "a cat", "--model", "qwen-image", "--width", "256", "--height", "256", "--out", "cat.png"
    )
    assert out.returncode == 0, out.stderr
    assert "Steps:    28 (default" in out.stdout
    assert "Guidance: 4.0 (classifier-free guidance)" in out.stdout
    assert "int4 weights" in out.stdout  # the plan names the export's formats
    png = Image.open(home / "cat.png").text
    assert "Steps: 28" in png["parameters"] and "CFG scale: 4.0" in png["parameters"]
    assert png["negative_prompt"] == " "  # diffusers' true CFG needs a negative: " " when none is said


def test_five_steps_are_refused(home):
    out = stepwise(home, "generate", "a cat", "--model", "qwen-image", "--steps", "5")
    assert out.returncode == 2
    lines = [line for line in out.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and "5" in lines[0] and "20" in lines[0] and "Traceback" not in out.stderr


def test_guidance_one_runs_without_cfg_and_ignores_the_negative(home):
    out = stepwise(
        home, "generate", "a cat", "--model", "qwen-image", "--width", "256", "--height", "272",
        "--steps", "20", "--guidance", "1", "--negative", "blurry", "--out", "one.png",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "--negative is ignored" in out.stdout + out.stderr
    png = Image.open(home / "one.png")
    assert png.size == (256, 272)
    assert "CFG scale: 1.0" in png.text["parameters"] and "blurry" not in png.text["parameters"]
