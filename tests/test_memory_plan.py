"""The memory plan at the asked size (engine/memory.py): activations estimated from the manifest, checked
against a measured peak; the VAE in tiles when it would not fit otherwise; a refused size names the size that
fits; ONNX Runtime's allocation failures as one-line errors naming the component and the fix.

The estimate's constants are measured (engine/memory.py); here the tiny models check the mechanics (what grows
with what, which option is chosen) and one fresh-process run checks the estimate against its peak.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException
from PIL import Image

import engine
from engine.memory import PHASED, activation_mb, plan_memory
from engine.session import Graph
from registry import manifest as manifest_format

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red apple"
# what ONNX Runtime 1.32 raises when its arena cannot grow (the message of a real failure, arena capped)
ARENA_FAILURE = (
    "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running MatMul node. "
    "Name:'/decoder/mid_block/attentions.0/MatMul' Status Message: /onnxruntime_src/onnxruntime/core/framework/"
    "bfc_arena.cc:360 void* onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*) "
    "Available memory of 72285696 is smaller than requested bytes of 17179869184\n"
)
MALLOC_FAILURE = (
    "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running Conv node. "
    "Status Message: bfc_arena.cc:376 Failed to allocate memory for requested buffer of size 1073741824"
)


@pytest.fixture(scope="module")
def sd15(exported_tiny):
    return exported_tiny("sd15")


def _phases(manifest):
    text = [n for n in manifest.components if n.startswith("text_encoder")]
    return {
        "encode": text,
        "image": ["vae_encoder"],
        "denoise": [manifest.config["denoiser"]],
        "decode": ["vae_decoder"],
    }


def _plan(folder, width, height, available_mb, **kwargs):
    manifest = manifest_format.read(folder)
    return plan_memory(manifest, _phases(manifest), available_mb=available_mb, width=width, height=height, **kwargs)


# --- the estimate ------------------------------------------------------------------------------------------


def test_activations_grow_with_the_size_and_the_guidance_batch(exported_tiny, sd15):
    m = manifest_format.read(sd15)
    # the VAE's mid-block attention: (h·w)² scores, so twice the side is ~16x
    small, large = (activation_mb(m, "vae_decoder", s, s) for s in (128, 256))
    assert 12 < large / small < 17
    # the UNet's attention is fused (never materialised): linear in the pixels; guidance doubles the batch
    unet = {s: activation_mb(m, "unet", s, s, batch=2) for s in (128, 256)}
    assert unet[256] / unet[128] == pytest.approx(4.0)
    assert activation_mb(m, "unet", 256, 256, batch=1) == pytest.approx(unet[256] / 2)
    # SD3's transformer attention is fused (exporters/attention.py: MultiHeadAttention): linear in the tokens
    # (image + 333 text tokens); unfused, the joint attention's scores would dominate and be quadratic
    sd3 = manifest_format.read(exported_tiny("sd3"))
    assert sd3.config["denoiser_attention"]["joint_tokens"] == 333
    assert sd3.components["transformer"]["fusion"]["multi_head_attention"] > 0
    ratio = activation_mb(sd3, "transformer", 512, 512) / activation_mb(sd3, "transformer", 256, 256)
    stride, scale = sd3.config["denoiser_attention"]["stride"], sd3.config["vae_scale_factor"]
    tokens = {s: (s // scale // stride) ** 2 + 333 for s in (256, 512)}
    assert ratio == pytest.approx(tokens[512] / tokens[256])
    sd3.components["transformer"]["fusion"]["multi_head_attention"] = 0
    unfused = activation_mb(sd3, "transformer", 512, 512) / activation_mb(sd3, "transformer", 256, 256)
    assert 10 < unfused < 16


def test_the_reported_case_is_estimated_at_its_activations(sd15):
    """Issue 11: 512x512 on tiny SD 1.5 was OOM-killed at 18.4 GB while the plan said 341 MB (weights only).
    Untiled, its VAE's mid-block attention alone is (256·256)² float32 scores, twice: ~36 GB."""
    untiled = _plan(sd15, 512, 512, 10**9, vae_tiling=False)
    assert untiled.need_mb > 18_400
    plan = _plan(sd15, 512, 512, 8_000)  # tiles are chosen: the image is decoded in 64x64 tiles
    assert plan.vae_tiling and plan.tile == 64 and plan.need_mb < 8_000 < plan.untiled_mb
    assert "VAE in 64x64 tiles (untiled ~" in plan.describe()


def test_tiles_come_last(sd15):
    """The untiled decode is diffusers' default image: tiles only when no policy fits without them."""
    roomy = _plan(sd15, 256, 256, 50_000)
    assert roomy.policy == engine.RESIDENT and not roomy.vae_tiling
    phased = _plan(sd15, 256, 256, roomy.phased_mb + 1)
    assert phased.policy == PHASED and not phased.vae_tiling
    tiled = _plan(sd15, 256, 256, roomy.phased_mb - 1)
    assert tiled.vae_tiling and tiled.need_mb < roomy.phased_mb
    assert _plan(sd15, 256, 256, 50_000, vae_tiling=True).vae_tiling  # --vae-tiling


def test_a_size_that_does_not_fit_names_the_largest_that_does(sd15):
    available = 1_500
    with pytest.raises(engine.EngineError) as info:
        _plan(sd15, 2048, 1024, available)
    message = str(info.value)
    assert "\n" not in message and "at 2048x1024 needs about" in message, message
    found = re.search(
        r"try (\d+)x(\d+) or smaller, or up to (\d+)x(\d+) with the VAE in tiles \(--vae-tiling\)", message
    )
    assert found, message
    plain_w, plain_h, tiled_w, tiled_h = map(int, found.groups())
    for w, h in ((plain_w, plain_h), (tiled_w, tiled_h)):  # SD 1.5's multiple of 64, the asked shape
        assert w % 64 == 0 and h == w // 2 // 64 * 64
    assert not _plan(sd15, plain_w, plain_h, available, vae_tiling=False).vae_tiling
    with pytest.raises(engine.EngineError):  # the next size up does not fit untiled
        _plan(sd15, plain_w + 128, plain_h + 64, available, vae_tiling=False)
    assert _plan(sd15, tiled_w, tiled_h, available).vae_tiling
    with pytest.raises(engine.EngineError):
        _plan(sd15, tiled_w + 128, tiled_h + 64, available)


def test_old_manifests_fall_back_to_conservative_values(sd15):
    """An export without the new fields: the denoiser is estimated as the largest real layout, the VAE from the
    vae_decoder/config.json beside its graph (exact)."""
    manifest = manifest_format.read(sd15)
    config = {k: v for k, v in manifest.config.items() if not k.startswith(("vae_sample", "vae_block", "vae_mid"))}
    config.pop("denoiser_attention")
    old = manifest_format.Manifest(manifest.folder, {**manifest.data, "config": config})
    for name in ("unet", "vae_decoder", "vae_encoder"):
        assert activation_mb(old, name, 256, 192) >= activation_mb(manifest, name, 256, 192), name
    assert activation_mb(old, "vae_decoder", 256, 192) == activation_mb(manifest, "vae_decoder", 256, 192)


def _cli(args, tmp_path, env=None, wrapper=None):
    code = wrapper or "import sys, cli; sys.argv = ['stepwise'] + sys.argv[1:]; cli.main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"STEPWISE_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **(env or {})},
        timeout=300,
    )


def _generate_args(folder, size, tmp_path, *extra):
    w, h = size
    return [
        "generate", PROMPT, "--model", str(folder), "--steps", "1", "--force", "--seed", "1",
        "--width", str(w), "--height", str(h), "--out", str(tmp_path / "out.png"), *extra,
    ]  # fmt: skip


def test_the_estimate_is_within_a_quarter_of_the_measured_peak(sd15, tmp_path):
    """A fresh process, where the activations dominate (the decode phase's VAE attention, ~2 GB): the plan's
    estimate is above the measured peak and within 25% of it."""
    profile = tmp_path / "profile.json"
    args = _generate_args(sd15, (256, 256), tmp_path, "--low-memory", "--profile-json", str(profile))
    out = _cli(args, tmp_path)
    assert out.returncode == 0, out.stderr
    estimate = float(re.search(r"Memory: +phased, ~([\d,]+) MB at 256x256", out.stdout).group(1).replace(",", ""))
    peak = json.loads(profile.read_text())["peak_rss_mb"]
    assert peak <= estimate <= 1.25 * peak, (estimate, peak)


# --- the pipeline ------------------------------------------------------------------------------------------


def test_generate_refuses_a_size_before_anything_runs(sd15):
    pipe = engine.load_pipeline(sd15, policy=PHASED, available_mb=1_000)
    calls = []
    with pytest.raises(engine.EngineError, match=r"at 1024x1024 needs about .* MB is available; try \d+x\d+"):
        pipe.generate(prompt=PROMPT, steps=2, guidance=7.5, width=1024, height=1024, seed=0, callback=calls.append)
    assert calls == [] and pipe.sessions.loaded() == []


def test_generate_tiles_the_vae_when_it_would_not_fit_untiled(sd15):
    """256x192: untiled, the tiny VAE's attention needs ~1.3 GB; on a 1 GB budget the plan tiles it."""
    args = dict(prompt=PROMPT, steps=2, guidance=7.5, width=256, height=192, seed=5)
    auto = engine.load_pipeline(sd15, available_mb=1_000, width=256, height=192).generate(**args)
    assert auto.parameters["vae_tiling"] == 64
    roomy = engine.load_pipeline(sd15, available_mb=50_000)
    forced = roomy.generate(**args, vae_tiling=True)
    untiled = roomy.generate(**args)
    assert "vae_tiling" not in untiled.parameters
    assert np.array_equal(auto.image, forced.image)
    assert np.array_equal(auto.latents, untiled.latents)  # the same sampling, decoded differently
    assert np.abs(auto.image.astype(int) - untiled.image.astype(int)).max() > 2


def test_image_to_image_encodes_in_tiles(sd15):
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (112, 144, 3), dtype=np.uint8))
    pipe = engine.load_pipeline(sd15, available_mb=50_000)
    args = dict(prompt=PROMPT, steps=4, guidance=7.5, seed=5, image=picture, strength=0.5)
    tiled, untiled = pipe.generate(**args, vae_tiling=True), pipe.generate(**args, vae_tiling=False)
    assert tiled.parameters["vae_tiling"] == 64 and tiled.image.shape == (112, 144, 3)
    assert not np.allclose(tiled.latents, untiled.latents, atol=1e-3)  # the start latents were encoded in tiles


# --- allocation failures inside ONNX Runtime -----------------------------------------------------------------


class _Exploding:
    """An InferenceSession whose run fails as ONNX Runtime does when it cannot allocate."""

    def __init__(self, session, exc):
        self.session, self.exc = session, exc

    def run(self, *args, **kwargs):
        raise self.exc

    def __getattr__(self, name):
        return getattr(self.session, name)


@pytest.mark.parametrize(
    "exc,size",
    [(Fail(ARENA_FAILURE), "16,384 MB"), (RuntimeException(MALLOC_FAILURE), "1,024 MB"), (MemoryError(), None)],
)
def test_an_allocation_failure_is_one_line_naming_the_component_and_the_fix(sd15, exc, size):
    graph = Graph(sd15 / "vae_decoder" / "model.onnx")
    graph.session = _Exploding(graph.session, exc)
    with pytest.raises(engine.EngineError) as info:
        graph(latent_sample=np.zeros((1, 4, 8, 8), np.float32))
    message = str(info.value)
    assert "\n" not in message and "running vae_decoder" in message, message
    for fix in ("--vae-tiling", "a smaller --width/--height", "--low-memory"):
        assert fix in message
    assert message.index("--vae-tiling") < message.index("--width")  # the VAE's own fix first
    if size:
        assert f"an allocation of {size} failed" in message


def test_other_onnxruntime_errors_are_not_called_memory(sd15):
    graph = Graph(sd15 / "vae_decoder" / "model.onnx")
    graph.session = _Exploding(graph.session, InvalidArgument("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : bad rank"))
    with pytest.raises(InvalidArgument):
        graph(latent_sample=np.zeros((1, 4, 8, 8), np.float32))


def test_an_allocation_failure_during_a_phase_stops_the_generation(sd15):
    def factory(path, threads):
        graph = Graph(path, threads)
        if path.parent.name == "unet":
            graph.session = _Exploding(graph.session, RuntimeException(MALLOC_FAILURE))
        return graph

    pipe = engine.load_pipeline(sd15, graph_factory=factory, available_mb=50_000)
    with pytest.raises(engine.EngineError, match=r"running unet .*; try a smaller --width/--height"):
        pipe.generate(prompt=PROMPT, steps=2, guidance=7.5, width=64, height=64, seed=0)


# --- the command line --------------------------------------------------------------------------------------


def _one_error_line(out):
    assert out.returncode == 2, (out.stdout, out.stderr)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    return errors[0]


def test_cli_prints_the_estimate_and_the_tiles(sd15, tmp_path):
    out = _cli(_generate_args(sd15, (192, 128), tmp_path, "--vae-tiling"), tmp_path)
    assert out.returncode == 0, out.stderr
    assert re.search(
        r"Memory: +resident, ~[\d,]+ MB at 192x128 \(.*\); VAE in 64x64 tiles \(--vae-tiling\)", out.stdout
    )
    assert Image.open(tmp_path / "out.png").text["vae_tiling"] == "64"


def test_cli_refuses_a_size_that_does_not_fit_in_one_line(sd15, tmp_path):
    out = _cli(_generate_args(sd15, (2048, 2048), tmp_path), tmp_path, env={"STEPWISE_AVAILABLE_MB": "1500"})
    error = _one_error_line(out)
    assert "at 2048x2048 needs about" in error and "or smaller" in error and "--vae-tiling" in error, error
    assert not (tmp_path / "out.png").exists()


def test_cli_reports_an_allocation_failure_in_one_line(sd15, tmp_path):
    wrapper = f"""
import sys, onnxruntime
from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException
def run(self, *args, **kwargs):
    raise RuntimeException({MALLOC_FAILURE!r})
onnxruntime.InferenceSession.run = run
import cli
sys.argv = ["stepwise"] + sys.argv[1:]
cli.main()
"""
    out = _cli(_generate_args(sd15, (64, 64), tmp_path), tmp_path, wrapper=wrapper)
    error = _one_error_line(out)
    assert "ONNX Runtime ran out of memory running text_encoder" in error, error
    assert "--low-memory" in error and "--vae-tiling" in error
