"""The benchmark's machinery: FLOP counting against hand-computed numbers, and one end-to-end run on the
tiny SD 1.5 pipeline (our engine and a tuning candidate, interleaved) that writes the JSON and the chart."""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from bench import flops  # noqa: E402


def _save(tmp_path, nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return path


def test_matmul_conv_gemm_flops_match_hand_count(tmp_path):
    rng = np.random.default_rng(0)
    w_mm = numpy_helper.from_array(rng.standard_normal((7, 11)).astype(np.float32), "w_mm")
    w_conv = numpy_helper.from_array(rng.standard_normal((8, 2, 3, 3)).astype(np.float32), "w_conv")
    w_gemm = numpy_helper.from_array(rng.standard_normal((6, 9)).astype(np.float32), "w_gemm")
    nodes = [
        helper.make_node("MatMul", ["a", "w_mm"], ["mm"]),  # (2,3,5,7) x (7,11)
        helper.make_node("Conv", ["x", "w_conv"], ["conv"], group=2, pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Gemm", ["g", "w_gemm"], ["gemm"], transB=1),  # (4,9) x (6,9)^T
        helper.make_node("MatMul", ["q", "k"], ["scores"]),  # attention-like: (b,h,s,d) x (b,h,d,l)
    ]
    inputs = [
        helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 3, 5, 7]),
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, "hh", "ww"]),
        helper.make_tensor_value_info("g", TensorProto.FLOAT, [4, 9]),
        helper.make_tensor_value_info("q", TensorProto.FLOAT, [2, 8, 16, 5]),
        helper.make_tensor_value_info("k", TensorProto.FLOAT, [2, 8, 5, 12]),
    ]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("mm", "conv", "gemm", "scores")]
    path = _save(tmp_path, nodes, inputs, outputs, [w_mm, w_conv, w_gemm])

    counted = flops.count(path, {"a": (2, 3, 5, 7), "x": (1, 4, 10, 10)})

    matmul = 2 * (2 * 3 * 5) * 11 * 7  # 2·M·N·K over the 2·3 batch
    conv = 2 * 8 * (4 // 2) * 3 * 3 * 5 * 5  # stride 2 → 5×5 outputs; Cin/groups = 2
    gemm = 2 * 4 * 6 * 9
    scores = 2 * (2 * 8) * 16 * 12 * 5
    assert counted.unresolved == []
    assert counted.by_op["MatMul"] == matmul
    assert counted.by_op["Conv"] == conv
    assert counted.by_op["Gemm"] == gemm
    assert counted.by_op["MatMul (attention)"] == scores
    assert counted.total == matmul + conv + gemm + scores


def test_shapes_through_reshape_chains_are_resolved(tmp_path):
    """Shape→Gather→Concat→Reshape, as the exporters write attention head splits, at a concrete input size."""
    w = numpy_helper.from_array(np.ones((6, 4), np.float32), "w")
    idx = numpy_helper.from_array(np.array(0, np.int64), "zero")
    rest = numpy_helper.from_array(np.array([3, 2], np.int64), "rest")
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "rest"], ["new_shape"], axis=0),
        helper.make_node("Reshape", ["x", "new_shape"], ["y"]),  # (b, 6) → (b, 3, 2)
        helper.make_node("Reshape", ["y", "flat"], ["z"]),
        helper.make_node("MatMul", ["z", "w"], ["out"]),
    ]
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")
    flat = numpy_helper.from_array(np.array([-1, 6], np.int64), "flat")
    path = _save(
        tmp_path,
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 6])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [w, idx, rest, axes, flat],
    )
    counted = flops.count(path, {"x": (5, 6)})
    assert counted.total == 2 * 5 * 4 * 6


@pytest.mark.slow
def test_bench_end_to_end_on_tiny_sd15(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from click.testing import CliRunner

    from bench.cli import bench_cmd

    monkeypatch.setenv("STEPWISE_HOME", str(tmp_path / "home"))
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["--model", "tiny:sd15", "--width", "64", "--height", "64", "--repeats", "2", "--steps", "4"]
    args += ["--engines", "stepwise,ort_no_spin", "--no-peak", "--json", str(out_json), "--chart", str(out_png)]
    cli = CliRunner().invoke(bench_cmd, args, catch_exceptions=False)
    assert cli.exit_code == 0, cli.output
    assert "| stepwise |" in cli.output

    data = json.loads(out_json.read_text())
    for key in ("model", "width", "height", "threads", "flops_per_step", "peak_gflops", "results"):
        assert key in data
    assert (data["model"], data["width"], data["height"]) == ("tiny:sd15", 64, 64)
    assert data["flops_per_step"] > 0 and data["vae_decode_flops"] > 0
    assert set(data["results"]) == {"stepwise", "ort_no_spin"}
    for result in data["results"].values():
        assert result["median_step_s"] > 0 and result["vae_decode_s"] > 0 and result["peak_rss_mb"] > 0
        assert len(result["step_s"]) == 2
    # the same graph on the same session settings but spinning: the same numbers
    assert data["results"]["ort_no_spin"]["latent_max_diff"] < 1e-4
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- other families: reduced-depth builds, extrapolation, every family's engines on its tiny model ---------


def test_extrapolation_to_the_real_depth_matches_hand_computed_values():
    from bench.run import combine_depths, extrapolate

    assert extrapolate(10.0, 14.0, 1, 2, 24) == 10.0 + 4.0 * 23  # 102 s: 23 more units at 4 s each
    assert extrapolate(3.0, 5.0, 1, 2, 19) == 39.0
    assert extrapolate(2.0, 3.0, 2, 4, 10) == 6.0  # (10 − 2) / (4 − 2) = 4 slopes of 0.5

    def point(ref_step, other_step, flops, text):
        result = {
            "median_step_s": ref_step,
            "first_step_s": ref_step + 1,
            "text_encode_s": text,
            "vae_decode_s": 7.0,
            "vae_ratio_to_stepwise": 1.0,
            "vae_gflops": 1.0,
            "glue_ms_per_step": 0.1,
            "load_s": 1.0,
            "peak_rss_mb": 100.0,
            "latent_max_diff": 0.0,
            "latent_max_abs": 1.0,
            "psnr_db": None,
        }
        result["ratio_to_stepwise"] = 1.0
        other = dict(result, median_step_s=other_step, latent_max_diff=1e-5, psnr_db=60.0)
        other["ratio_to_stepwise"] = other_step / ref_step
        return {
            "family": "sd3", "width": 1024, "height": 1024, "threads": 2, "steps": 20, "repeats": 2,
            "guidance": 7.0, "reference": "stepwise", "flops_per_step": flops, "vae_decode_flops": 5,
            "text_encoder_flops": 10, "peak_gflops": 1000.0, "machine": {}, "versions": {}, "wall_s": 1.0,
            "load_average": [1.0, 2.0], "results": {"stepwise": result, "pytorch": other},
        }  # fmt: skip

    plan = {"units": [1, 2], "denoiser": {"real": 24}, "text": {"real": 24}}
    data = combine_depths("random:sd3-medium", plan, [point(10, 20, 1e12, 0.5), point(14, 30, 1.5e12, 0.7)])
    ref, torch = data["results"]["stepwise"], data["results"]["pytorch"]
    assert ref["median_step_s"] == 102.0 and torch["median_step_s"] == 20 + 10 * 23  # 250
    assert ref["first_step_s"] == 103.0
    assert torch["ratio_to_stepwise"] == round(250 / 102, 3)
    assert data["flops_per_step"] == round(1e12 + 0.5e12 * 23)  # FLOPs extrapolate the same way
    assert ref["gflops"] == round(12.5e12 / 102 / 1e9, 1)
    assert ref["text_encode_s"] == round(0.5 + 0.2 * 23, 4)
    assert ref["vae_decode_s"] == 7.0  # the first build's, the VAE is full size in both
    assert torch["latent_max_diff"] == 1e-5 and torch["median_step_s_points"] == [20, 30]
    assert ref["estimate"] and data["estimate"]["denoiser_real_units"] == 24 and len(data["points"]) == 2

    # a second run on a busier machine: the deeper build came out faster, the line is unusable → FLOP-scaled
    slower = point(10, 20, 1e12, 0.5)
    data = combine_depths("random:sd3-medium", plan, [slower, point(8, 16, 1.5e12, 0.4)])
    flops_real = 1e12 + 0.5e12 * 23
    assert data["results"]["stepwise"]["method"] == "flops-scaled"
    assert data["results"]["stepwise"]["median_step_s"] == round(8 * flops_real / 1.5e12, 4)
    assert data["results"]["pytorch"]["ratio_to_stepwise"] == 2.0  # the deeper build's same-round ratio

    from bench import report

    data = combine_depths("random:sd3-medium", plan, [point(10, 20, 1e12, 0.5), point(14, 30, 1.5e12, 0.7)])
    table = report.tables(data)
    assert "| stepwise | est. (1, 2 → 24 units) | 102.00 |" in table
    assert "| pytorch | est. (1, 2 → 24 units) | 250.00 | 2.45 |" in table


def test_reduced_configs_cut_the_repeated_units_only():
    from bench import random_model

    full = random_model.config("sdxl")
    assert full["unet"]["transformer_layers_per_block"] == [1, 2, 10]
    assert full["text_encoder_2"]["num_hidden_layers"] == 32
    two = random_model.config("sdxl@u2")
    assert two["unet"]["transformer_layers_per_block"] == [1, 2, 2]
    assert two["text_encoder_2"]["num_hidden_layers"] == 2
    assert two["unet"]["block_out_channels"] == full["unet"]["block_out_channels"]  # full width
    flux = random_model.config("flux-schnell@u2")["transformer"]
    assert (flux["num_layers"], flux["num_single_layers"], flux["num_attention_heads"]) == (2, 4, 24)
    sd3 = random_model.config("sd3-medium@u1")
    assert sd3["transformer"]["num_layers"] == 1 and sd3["text_encoder_3"]["num_layers"] == 1
    assert sd3["text_encoder_2"]["num_hidden_layers"] == 32  # CLIP-G stays full for SD3
    assert random_model.reduced("sd15") is None and random_model.reduced("sd3-medium")["denoiser"]["real"] == 24
    assert random_model.cache_name("random:flux-schnell@u2") == "random-flux-schnell-u2"
    for family in ("sdxl", "sd3-medium", "flux-schnell"):
        assert random_model.config(family)["registry_model"] == family


# PyTorch's step against ours after the timed steps: independent implementations (diffusers eager vs the
# exported graph under our family code) on the same weights; fp32 reorderings only.
STEP_TOLERANCE = 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux-schnell"])
def test_family_bench_end_to_end_on_tiny_model(family, exported_tiny, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    import importlib.util

    import registry
    from bench import random_model, report, run
    from exporters.families import TINY_SOURCES

    monkeypatch.setenv("STEPWISE_HOME", str(tmp_path / "home"))
    engines = ["stepwise", "pytorch", "ort_plain"]  # ort_plain: SD 1.5 only, left out with one line
    if importlib.util.find_spec("openvino"):
        engines.append("openvino_fp32")
    messages = []
    entry = registry.get(TINY_SOURCES[family][1])
    data = run.run(
        model=f"tiny:{family}",
        folder=exported_tiny(family),
        source=random_model.source_folder(f"tiny:{family}", progress=messages.append),
        work=tmp_path / "graphs",
        width=64,
        height=64,
        steps=entry.default_steps,
        threads=2,
        repeats=1,
        engines=engines,
        measure_peak=False,
        guidance=entry.guidance,
        progress=messages.append,
    )
    assert any("ort_plain: the ORT tuning candidates" in m for m in messages)
    assert set(data["results"]) == {e for e in engines if e != "ort_plain"}
    assert data["flops_per_step"] > 0 and data["vae_decode_flops"] > 0 and data["text_encoder_flops"] > 0
    assert data["flops_detail"]["unet_unresolved"] == 0
    assert (data["guidance"] is None) == (family == "flux-schnell")  # schnell runs without CFG
    for result in data["results"].values():
        assert result["median_step_s"] > 0 and result["vae_decode_s"] > 0
    torch = data["results"]["pytorch"]
    assert torch["latent_max_diff"] < STEP_TOLERANCE * max(1.0, torch["latent_max_abs"]), torch
    assert torch["psnr_db"] > 40
    if "openvino_fp32" in data["results"]:
        assert data["results"]["openvino_fp32"]["latent_max_diff"] < STEP_TOLERANCE * max(1.0, torch["latent_max_abs"])
    assert "| pytorch | measured |" in report.tables(data)


# --- resident vs phased (bench/phases.py) ----------------------------------------------------------------


@pytest.mark.slow
def test_phases_bench_runs_both_policies_on_tiny_sd15(exported_tiny, tmp_path, monkeypatch):
    from bench import phases

    monkeypatch.setenv("STEPWISE_HOME", str(tmp_path / "home"))  # the children's timings.json
    out = tmp_path / "phases.json"
    data = phases.run("tiny:sd15", exported_tiny("sd15"), 64, 64, 2, None, 0, 1, None, out)
    assert json.loads(out.read_text()) == data
    assert [r["policy"] for r in data["runs"]] == ["resident", "phased"]
    assert [r["plan_policy"] for r in data["runs"]] == ["resident", "phased"]  # the tiny model fits
    assert data["identical_images"] and data["max_pixel_diff"] == 0
    resident, phased = data["runs"]
    assert phased["plan_estimate_mb"] < resident["plan_estimate_mb"]
    for r in data["runs"]:
        assert r["peak_rss_mb"] > 0 and r["peak_rss_mb_wait4"] >= r["peak_rss_mb"] * 0.9
        assert r["wall_s"] > r["load_s"] > 0 and r["vae_decode_s"] > 0 and r["rss_trace_mb"]
        assert len(r["step_s"]) == 3  # PNDM (SD 1.5's scheduler) calls the UNet 3 times for 2 steps
    assert set(data["components_mb"]) >= {"unet", "text_encoder", "vae_decoder"}
