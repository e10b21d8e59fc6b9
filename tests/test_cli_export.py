"""`stepwise export` and `stepwise demo` as a person runs them (subprocesses, a fresh STEPWISE_HOME)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def stepwise(home, *args):
    env = {
        "STEPWISE_HOME": str(home),
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(home / "hf"),
    }
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args], cwd=home, capture_output=True, text=True, env=env, timeout=600
    )


def test_export_then_models_shows_it_then_generate(tmp_path):
    out = stepwise(tmp_path, "export", "tiny:sd15", "--model", "sd15")
    assert out.returncode == 0, out.stderr
    folder = tmp_path / "models" / "sd15"
    manifest = json.loads((folder / "stepwise.json").read_text())
    assert manifest["model_id"] == "sd15" and manifest["family"] == "sd15"
    assert all(c["validation"]["max_abs_diff"] <= c["validation"]["atol"] for c in manifest["components"].values())
    rows = json.loads(stepwise(tmp_path, "models", "--json").stdout)
    assert next(r for r in rows if r["id"] == "sd15")["exported"] == str(folder)
    gen = stepwise(
        tmp_path, "generate", "a red apple", "--model", "sd15", "--steps", "20", "--seed", "1", "--out", "sd15.png"
    )
    assert gen.returncode == 0, gen.stderr
    assert (tmp_path / "sd15.png").is_file()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["export", "tiny:nope"], "unknown tiny family"),
        (["export", "."], "model_index.json"),
        (["export", "tiny:sd15", "--model", "flux-dev"], "flux"),
        (["export", "some-org/some-model"], "HF_HUB_OFFLINE"),
        # --model alone takes the registry's checkpoint (offline here, so it names what it would fetch)
        (["export", "--model", "sdxl-lightning"], "stabilityai/stable-diffusion-xl-base-1.0"),
        (["export"], "say what to export"),
    ],
)
def test_export_errors_are_one_line(tmp_path, args, needle):
    out = stepwise(tmp_path, *args)
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").glob("*/stepwise.json"))


def test_demo_uses_an_existing_export(tmp_path, exported_tiny):
    """The demo's model lives in its own folder (never over the real sdxl-turbo id) and is built once."""
    (tmp_path / "models").mkdir()
    shutil.copytree(exported_tiny("sdxl", model_id="sdxl-turbo"), tmp_path / "models" / "demo-sdxl-turbo")
    out = stepwise(tmp_path, "demo")
    assert out.returncode == 0, out.stderr
    assert "building a tiny" not in out.stdout and "RANDOM weights" in out.stdout
    models = json.loads(stepwise(tmp_path, "models", "--json").stdout)
    assert next(m for m in models if m["id"] == "sdxl-turbo")["exported"] is None  # the real id stays free
    assert "saved stepwise-demo.png" in out.stdout and "median per step" in out.stdout
    assert (tmp_path / "stepwise-demo.png").is_file()
