"""The command line as a person uses it: exit codes, one-line errors, the plan, the interactive questions.

Each case runs `python cli.py` in a subprocess with an empty STEPWISE_HOME. A wrapper records which heavy
modules were imported, to prove policy refusals happen before anything is loaded.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WRAPPER = """
import atexit, json, os, sys
@atexit.register
def _report():
    heavy = sorted(m for m in ("onnxruntime", "torch", "diffusers") if m in sys.modules)
    with open(os.environ["LOADED_REPORT"], "w") as f:
        json.dump(heavy, f)
sys.argv = ["stepwise"] + sys.argv[1:]
import cli
cli.main()
"""


def run(args, tmp_path, stdin=None):
    env = {
        "STEPWISE_HOME": str(tmp_path / "home"),
        "LOADED_REPORT": str(tmp_path / "loaded.json"),
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
    }
    out = subprocess.run(
        [sys.executable, "-c", WRAPPER, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        input=stdin or "",
        env=env,
        timeout=120,
    )
    loaded = json.loads((tmp_path / "loaded.json").read_text()) if (tmp_path / "loaded.json").exists() else None
    return out, loaded


def assert_one_line_error(out, code, *needles):
    assert out.returncode == code, (out.stdout, out.stderr)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr
    assert "Traceback" not in out.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_models_json_lists_all_fourteen(tmp_path):
    out, _ = run(["models", "--json"], tmp_path)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert len(rows) == 14
    keys = {
        "id",
        "name",
        "menu",
        "family",
        "hub_id",
        "min_steps",
        "default_steps",
        "recommended_steps",
        "max_useful_steps",
        "guidance",
        "width",
        "height",
    }
    for row in rows:
        assert keys <= set(row)
    turbo = next(r for r in rows if r["id"] == "sdxl-turbo")
    assert (turbo["menu"], turbo["default_steps"], turbo["recommended_steps"]) == (1, 1, [1, 4])


def test_models_table(tmp_path):
    out, _ = run(["models"], tmp_path)
    assert out.returncode == 0
    assert "sdxl-turbo" in out.stdout and "hidream-i1-fast" in out.stdout  # every family has an engine now


def test_turbo_at_20_steps_is_refused_before_loading(tmp_path):
    out, loaded = run(["generate", "a cat", "--model", "sdxl-turbo", "--steps", "20"], tmp_path)
    assert_one_line_error(out, 2, "1-4", "worse")
    assert loaded == []


def test_turbo_without_steps_plans_one_step(tmp_path):
    out, loaded = run(["generate", "a cat", "--model", "sdxl-turbo"], tmp_path)
    assert "Steps:    1 (default" in out.stdout
    # not exported: the plan is printed, then one line says how to export it
    assert_one_line_error(out, 1, "stepwise export stabilityai/sdxl-turbo --model sdxl-turbo")
    assert loaded == []


def test_sd3_medium_plans_20_and_sd35_large_refuses_5(tmp_path):
    out, _ = run(["generate", "a cat", "--model", "sd3-medium"], tmp_path)
    assert "Steps:    20 (default" in out.stdout
    out, loaded = run(["generate", "a cat", "--model", "sd3.5-large", "--steps", "5"], tmp_path)
    assert_one_line_error(out, 2, "too few", "at least 20")
    assert loaded == []


def test_force_runs_a_refused_count_and_warnings_warn(tmp_path):
    out, _ = run(["generate", "a cat", "--model", "sdxl-turbo", "--steps", "20", "--force"], tmp_path)
    assert "Steps:    20" in out.stdout
    assert "warning:" in out.stderr and "worse" in out.stderr
    out, _ = run(["generate", "a cat", "--model", "sd15", "--steps", "40"], tmp_path)
    assert "Steps:    40" in out.stdout
    assert "warning: 40 steps is past SD 1.5's recommended 20-30" in out.stderr


@pytest.mark.parametrize(
    "args, needles",
    [
        (["generate", "a cat", "--model", "sdxl-turbo", "--guidance", "7"], ["takes no guidance"]),
        (["generate", "a cat", "--model", "sd15", "--guidance", "-1"], ["0 or more"]),
        (["generate", "a cat", "--model", "sd15", "--width", "500"], ["multiple of 64"]),
        (["generate", "a cat", "--model", "sd15", "--height", "4096"], ["outside"]),
        (["generate", "a cat", "--model", "sd15", "--seed", "-5"], ["--seed"]),
        (["generate", "   ", "--model", "sd15"], ["prompt is empty"]),
        (["generate", "a cat", "--model", "nope"], ["unknown model 'nope'"]),
        (["generate", "a cat", "--model", "sd15", "--steps", "0"], ["at least 1"]),
        (["generate", "a cat", "--model", "sd15", "--threads", "0"], ["--threads"]),
        (["generate", "a cat", "--model", "./no/such/folder"], ["not a folder"]),
        (["export", "tiny:sd15", "--model", "nope"], ["unknown model 'nope'"]),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, args, needles):
    out, loaded = run(args, tmp_path)
    assert_one_line_error(out, 2, *needles)
    assert not loaded or loaded == []


def test_unsupported_family_says_so(monkeypatch):
    """Every registry family has an engine now: the message is checked on one marked engine-less in-process."""
    import dataclasses

    import cli
    import registry

    model = registry.get("hidream-i1")
    family = dataclasses.replace(registry.family("hidream"), exportable=False)
    message = cli.not_exported_message(cli.Target(model, family, None, model.id))
    assert "no Stepwise engine yet" in message and "\n" not in message


def test_estimate_uses_measured_step_time(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "timings.json").write_text(json.dumps({"sdxl-turbo|512x512|threads=auto": {"median_step_ms": 2000}}))
    out, _ = run(["generate", "a cat", "--model", "sdxl-turbo", "--steps", "4"], tmp_path)
    assert "≈ 4 steps × 2.00 s/step = 8.0 s" in out.stdout


# ---- interactive mode, driven through stdin as the guide shows it


def test_interactive_enter_takes_the_default(tmp_path):
    out, _ = run([], tmp_path, stdin="\na cat\n\n")  # Enter at the menu: SDXL Turbo, as the guide shows
    assert "Select model [1-14, Enter = 1]:" in out.stdout
    # said before the prompt is asked, not found out after the dialogue
    assert out.stdout.index("note: SDXL Turbo is not exported") < out.stdout.index("Enter prompt:")
    assert "Enter prompt:" in out.stdout
    assert "Number of steps [default, or enter number]:" in out.stdout
    assert "→ 1 step (optimal for SDXL Turbo) ✅" in out.stdout
    assert "Steps:    1 (default" in out.stdout


def test_interactive_too_many_asks_again(tmp_path):
    out, _ = run(["generate"], tmp_path, stdin="1\na cat\n20\n4\n")
    assert "TOO MANY ❌" in out.stdout and "worse" in out.stdout
    assert "→ 4 steps: good ✅" in out.stdout
    assert "Steps:    4" in out.stdout


def test_interactive_too_few_then_good(tmp_path):
    out, _ = run(["generate"], tmp_path, stdin="2\na cat\n5\n30\n")
    assert "TOO FEW ❌" in out.stdout and "blurry" in out.stdout
    assert "→ 30 steps: good ✅" in out.stdout
    assert "Steps:    30" in out.stdout


def test_interactive_bad_menu_choice_and_eof(tmp_path):
    out, _ = run(["generate"], tmp_path, stdin="99\n")
    assert "'99' is not on the list" in out.stdout
    assert_one_line_error(out, 2, "no answer on standard input")
