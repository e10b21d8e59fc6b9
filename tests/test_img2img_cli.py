"""`stepwise generate --image/--mask/--strength` end to end on a tiny export: the plan speaks of the steps that
run, the PNG records `Denoising strength` as AUTOMATIC1111 does, and every bad input is one line, exit 2,
nothing written. The pixels themselves are tested against diffusers in tests/test_img2img_parity.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def home(tmp_path_factory, exported_tiny):
    """A STEPWISE_HOME with the tiny SD 1.5 export as `sd15`, pictures, and an export without a VAE encoder."""
    home = tmp_path_factory.mktemp("home")
    (home / "models").mkdir()
    shutil.copytree(exported_tiny("sd15"), home / "models" / "sd15")
    no_encoder = home / "no-encoder"
    shutil.copytree(exported_tiny("sd15"), no_encoder)
    manifest = json.loads((no_encoder / "stepwise.json").read_text())
    del manifest["components"]["vae_encoder"]
    (no_encoder / "stepwise.json").write_text(json.dumps(manifest))
    shutil.rmtree(no_encoder / "vae_encoder")
    picture = np.zeros((80, 144, 3), np.uint8)
    picture[..., 0] = np.linspace(0, 255, 144, dtype=np.uint8)[None, :]
    picture[20:60, 30:90] = (20, 200, 40)
    Image.fromarray(picture).save(home / "in.png")
    mask = np.zeros((80, 144), np.uint8)
    mask[10:50, 20:100] = 255
    Image.fromarray(mask).save(home / "mask.png")
    Image.fromarray(mask[:40]).save(home / "small-mask.png")
    (home / "not-an-image.png").write_text("hello")
    return home


def stepwise(home, *args):
    env = {"STEPWISE_HOME": str(home), "PATH": "/usr/bin:/bin", "HOME": str(home)}
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args], cwd=home, capture_output=True, text=True, env=env, timeout=300
    )


def test_img2img_takes_the_image_size_and_records_the_strength(home):
    out = stepwise(home, "generate", "a cat", "--model", "sd15", "--image", "in.png", "--strength", "0.5",
                   "--steps", "40", "--seed", "3", "--out", "cat.png")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "Steps:    20 run, the last of 40" in out.stdout
    assert "image-to-image, strength 0.5" in out.stdout
    image = Image.open(home / "cat.png")
    # 144x80 rounded down to SD's multiple of 64 (the same size rule as text-to-image)
    assert image.size == (128, 64)
    params = image.text["parameters"]
    assert "Steps: 40," in params and "Denoising strength: 0.5" in params
    assert image.text["strength"] == "0.5"


def test_inpainting_runs_phased_with_low_memory(home):
    args = ["--image", "in.png", "--mask", "mask.png", "--width", "128", "--height", "64", "--low-memory"]
    out = stepwise(home, "generate", "a cat", "--model", "sd15", *args, "--seed", "3", "--out", "inpaint.png")
    assert out.returncode == 0, out.stderr
    assert "Memory:   phased" in out.stdout and "inpainting" in out.stdout
    # strength 1.0 (SD's inpaint default): all of SD 1.5's default 20 steps run
    assert "Steps:    20 run, the last of 20" in out.stdout
    assert Image.open(home / "inpaint.png").size == (128, 64)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "not-an-image.png"], "not an image"),
        (["--image", "missing.png"], "does not exist"),
        (["--image", "in.png", "--mask", "small-mask.png"], "give a mask of the image's size"),
        (["--image", "in.png", "--strength", "0"], "--strength must be in (0, 1]"),
        (["--image", "in.png", "--strength", "1.5"], "--strength must be in (0, 1]"),
        (["--mask", "mask.png"], "--mask needs --image"),
        (["--strength", "0.5"], "--strength needs --image"),
        (["--image", "in.png", "--strength", "0.01", "--steps", "20", "--force"], "runs no step"),
        (["--image", "in.png", "--model", "./no-encoder"], "without its VAE encoder"),
    ],
    ids=[
        "not-image",
        "missing",
        "mask-size",
        "strength-0",
        "strength-high",
        "mask-alone",
        "strength-alone",
        "no-step",
        "no-encoder",
    ],  # fmt: skip
)
def test_bad_image_inputs_are_one_line_errors_and_write_nothing(home, args, message):
    if "--model" not in args:
        args = [*args, "--model", "sd15"]
    out = stepwise(home, "generate", "a cat", *args, "--seed", "1", "--out", "bad.png")
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (home / "bad.png").exists()
