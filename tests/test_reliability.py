"""Fault injection: what a user keeps when things go wrong (docs/reliability.md has the table).

Kills and signals during export and during the PNG write, a full disk and a read-only folder (real tmpfs
mounts, when run as root; skipped otherwise), corrupted, truncated and malformed exports, non-finite inputs,
and two generations on one export at once. Every failure is one line on stderr, a non-zero exit, no
traceback, and nothing half-written where the user looks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from registry.files import atomic_write

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def cli(home, *args, cwd=None, wait=True):
    env = {"STEPWISE_HOME": str(home), "PATH": "/usr/bin:/bin", "HOME": str(home), "STEPWISE_GRAPH_CACHE": "0"}
    cmd = [sys.executable, str(ROOT / "cli.py"), *args]
    if not wait:
        return subprocess.Popen(
            cmd, cwd=cwd or home, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(cmd, cwd=cwd or home, env=env, capture_output=True, text=True, timeout=300)


def one_line_error(out, code, fragment):
    assert out.returncode == code, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], out.stderr


@pytest.fixture
def home(tmp_path, exported_tiny):
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    shutil.copytree(exported_tiny("sd15"), home / "models" / "sd15")
    return home


def generate(home, *args, out="out.png"):
    return cli(home, "generate", "a cat", "--model", "sd15", "--steps", "20", "--seed", "1", "--out", out, *args)


def _mount_tmpfs(path: Path, options: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0
    )


@pytest.fixture
def tmpfs(tmp_path):
    """mount(options) -> a fresh tmpfs folder, unmounted afterwards; skips where mounting is not allowed."""
    mounted = []

    def mount(options: str) -> Path:
        path = tmp_path / f"mnt{len(mounted)}"
        if not _mount_tmpfs(path, options):
            pytest.skip("needs root and tmpfs mounts (CI runs as root)")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# --- export: killed or terminated ------------------------------------------------------------------------


def _wait_for(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]


def _export_under_way(tmp_path):
    """An export of tiny:sd15 to tmp_path/exports/mine that has written its first graph: (home, out, process)."""
    home, out = tmp_path / "home", tmp_path / "exports" / "mine"
    out.parent.mkdir(parents=True)
    proc = cli(home, "export", "tiny:sd15", "--out", str(out), cwd=tmp_path, wait=False)
    assert _wait_for(lambda: any((p / "text_encoder").exists() for p in _leftovers(out.parent)))
    return home, out, proc


def test_sigkill_during_export_is_reclaimed_by_the_next_export(tmp_path):
    home, out, proc = _export_under_way(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(_leftovers(out.parent)) == 1 and not out.exists()  # the user's --out is untouched
    again = cli(home, "export", "tiny:sd15", "--out", str(out), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "left by killed exports" in again.stderr and "MB reclaimed" in again.stderr
    assert _leftovers(out.parent) == [] and (out / "stepwise.json").is_file()


def test_sigterm_during_export_leaves_nothing(tmp_path):
    _, out, proc = _export_under_way(tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
    assert _leftovers(out.parent) == [] and not out.exists()


# --- the PNG write ---------------------------------------------------------------------------------------


def test_a_write_cut_short_keeps_the_old_file(tmp_path):
    target = tmp_path / "image.png"
    target.write_bytes(b"the old picture")

    def half_then_fail(f):
        f.write(b"half a new pic")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"the old picture"
    assert [p.name for p in tmp_path.iterdir()] == ["image.png"]  # no temporary file left either


def test_sigkill_while_saving_keeps_the_old_png(tmp_path):
    """A process killed in the middle of writing: the file at the path is still the old one, whole."""
    target = tmp_path / "image.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(target)
    code = (
        "import os, signal, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from registry.files import atomic_write\n"
        "def write(f):\n"
        "    f.write(b'\\x89PNG half')\n"
        "    f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        f"atomic_write({str(target)!r}, write)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert Image.open(target).getpixel((0, 0)) == (255, 0, 0)


def test_a_full_disk_is_found_before_loading_and_keeps_the_old_png(home, tmpfs):
    small = tmpfs("size=64k")
    (small / "fill").write_bytes(b"\0" * 60_000)
    out = generate(home, "--width", "256", "--height", "256", out=str(small / "big.png"))
    one_line_error(out, 2, "MB free")
    assert "Memory:" not in out.stdout  # refused before anything was loaded


def test_a_read_only_folder_is_found_before_loading(home, tmpfs):
    read_only = tmpfs("ro,size=1m")
    out = generate(home, out=str(read_only / "x.png"))
    one_line_error(out, 2, "not writable")
    out = generate(home, "--profile-json", str(read_only / "p.json"))
    one_line_error(out, 2, "not writable")
    assert not (home / "out.png").exists()


@pytest.mark.parametrize(
    "out, fragment", [("folder", "is a folder"), ("image.jpg", "must end in .png"), ("x.png/", "is a folder")]
)
def test_bad_output_names_are_refused_before_loading(home, out, fragment):
    (home / "folder").mkdir()
    (home / "x.png").mkdir()
    result = generate(home, out=out)
    one_line_error(result, 2, fragment)


def test_an_unwritable_home_still_saves_the_image(home, tmp_path):
    """The timings file cannot be written (its folder is a file): a warning, and the image is saved."""
    models = home / "models"
    env_home = tmp_path / "bad-home"
    env_home.mkdir()
    (env_home / "models").symlink_to(models)
    (env_home / "timings.json").mkdir()  # replacing it fails
    out = cli(env_home, "generate", "a cat", "--model", "sd15", "--steps", "20", "--seed", "1", "--out", "a.png")
    assert out.returncode == 0, out.stderr
    assert "warning: the step time was not recorded" in out.stderr
    assert (env_home / "a.png").is_file()


# --- damaged exports -------------------------------------------------------------------------------------


def test_a_corrupted_graph_of_the_right_size_is_refused(home):
    graph = home / "models" / "sd15" / "unet" / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    one_line_error(generate(home), 2, "does not match the sha256")
    one_line_error(cli(home, "verify", "sd15"), 1, "does not match the sha256")


def test_a_truncated_graph_is_refused(home):
    graph = home / "models" / "sd15" / "vae_decoder" / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])
    one_line_error(generate(home), 2, "the manifest says")


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda m: [m], "not a manifest object"),
        (lambda m: {k: v for k, v in m.items() if k != "family"}, "names no model family"),
        (lambda m: {**m, "family": "sd9"}, "Stepwise does not know"),
        (lambda m: {**m, "components": {}}, "lists no components"),
        (lambda m: {**m, "components": {"unet": {"path": "../../etc/passwd"}}}, "points outside the export"),
    ],
    ids=["a-list", "no-family", "unknown-family", "no-components", "outside"],
)
def test_malformed_manifests_are_one_line_errors(home, damage, fragment):
    path = home / "models" / "sd15" / "stepwise.json"
    path.write_text(json.dumps(damage(json.loads(path.read_text()))))
    result = generate(home)
    assert "Traceback" not in result.stderr
    assert result.returncode in (1, 2) and fragment in result.stderr, result.stderr


def test_a_missing_scheduler_config_is_one_line(home):
    (home / "models" / "sd15" / "scheduler" / "scheduler_config.json").unlink()
    one_line_error(generate(home), 2, "scheduler_config.json cannot be read")


# --- numbers ---------------------------------------------------------------------------------------------


def test_non_finite_inputs_are_refused_up_front(home):
    nan = np.full((1, 4, 32, 32), np.nan, np.float32)
    np.save(home / "nan.npy", nan)
    one_line_error(generate(home, "--width", "64", "--height", "64", "--latents", "nan.npy"), 2, "NaN")
    one_line_error(generate(home, "--guidance", "inf"), 2, "finite")
    one_line_error(generate(home, "--guidance", "nan"), 2, "finite")
    np.savez(home / "two.npz", a=nan, b=nan)
    one_line_error(generate(home, "--latents", "two.npz"), 2, "--latents")
    (home / "text.npy").write_text("1 2 3")
    one_line_error(generate(home, "--latents", "text.npy"), 2, "not a .npy array")


def test_too_many_threads_are_capped_with_a_warning(home):
    out = generate(home, "--threads", "1000", "--width", "64", "--height", "64")
    assert out.returncode == 0, out.stderr
    assert f"using {os.cpu_count()}" in out.stderr


# --- concurrency -----------------------------------------------------------------------------------------


def test_two_generations_on_one_export_at_once(home):
    procs = [
        cli(home, "generate", "a cat", "--model", "sd15", "--steps", "20", "--seed", str(s), "--out", f"{s}.png",
            "--width", "64", "--height", "64", wait=False)
        for s in (1, 2)
    ]  # fmt: skip
    for p in procs:
        p.communicate(timeout=300)
        assert p.returncode == 0
    alone = generate(home, "--width", "64", "--height", "64", out="alone.png")
    assert alone.returncode == 0
    assert np.array_equal(np.asarray(Image.open(home / "1.png")), np.asarray(Image.open(home / "alone.png")))


def test_a_sampler_of_the_wrong_kind_is_refused(home):
    """A flow-matching sampler on a noise-prediction UNet (or back) would draw garbage: refused."""
    out = generate(home, "--scheduler", "FlowMatchEulerDiscreteScheduler", "--width", "64", "--height", "64")
    one_line_error(out, 2, "a noise-prediction (diffusion) model")
    assert not (home / "out.png").exists()
