"""DeepFloyd IF's full-size bench inputs: the real configs (bench/configs/deepfloyd-if{,-ii}.json), the random
cascade bench.random_weights writes from them, the cascade's per-stage profile lines bench.big_models reads,
and its `stepwise models` memory figures (registry/footprint.py), each against an independent reference:
the parameter counts DeepFloyd's model cards and the registry state, diffusers' IF pipelines loading the
folders, the engine's own profile text, and the footprint arithmetic done by hand."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import registry  # noqa: E402
from bench import big_models, random_model, random_weights  # noqa: E402
from engine.profile import format_profile  # noqa: E402
from registry import footprint  # noqa: E402

MB = 2**20


def _params_m(family: str, component: str) -> float:
    module, _ = random_weights.meta_module(component, random_model.config(family)[component])
    return sum(p.numel() for p in module.parameters()) / 1e6


def test_the_configs_have_the_model_cards_sizes_and_the_registry_counts():
    entry = registry.get("deepfloyd-if")
    stage_1, stage_2 = random_model.config("deepfloyd-if"), random_model.config("deepfloyd-if-ii")
    assert stage_1["stage_2"] == "deepfloyd-if-ii" and stage_2["pipeline"] == "IFSuperResolutionPipeline"
    # the model cards: IF-I-XL 4.3 B, IF-II-L 1.2 B; T5-v1.1-XXL's encoder 4,762 M (as SD 3's and FLUX's)
    unet, unet_2, t5 = (
        _params_m("deepfloyd-if", "unet"),
        _params_m("deepfloyd-if-ii", "unet"),
        _params_m("deepfloyd-if", "text_encoder"),
    )
    assert 4250 < unet < 4350 and 1150 < unet_2 < 1250 and abs(t5 - 4762) < 1
    for count, key in ((unet, "unet"), (unet_2, "unet_2"), (t5, "text_encoder")):
        assert int(count) == entry.params_m[key], key  # M, rounded down


def _tiny(family: str) -> dict:
    """A real IF config cut to test widths (its structure kept: block types, scale-shift, text_proj, gelu)."""
    cfg = copy.deepcopy(random_model.config(family))
    levels = len(cfg["unet"]["block_out_channels"])
    cfg["unet"].update(
        block_out_channels=[32, 64] * (levels // 2) + [64] * (levels % 2),
        attention_head_dim=8,
        cross_attention_dim=32,
        encoder_hid_dim=64,
        norm_num_groups=8,
        addition_embed_type_num_heads=2,
        sample_size=16,
    )
    if "text_encoder" in cfg:
        cfg["text_encoder"].update(d_model=64, d_kv=16, d_ff=96, num_layers=1, num_heads=4, vocab_size=192)
    else:
        cfg["unet"]["time_embedding_dim"] = 64
    return cfg


def test_the_random_cascade_loads_in_diffusers_if_pipelines(tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    configs.mkdir()
    for family in ("deepfloyd-if", "deepfloyd-if-ii"):
        (configs / f"{family}.json").write_text(json.dumps(_tiny(family)))
    monkeypatch.setattr(random_model, "CONFIGS", configs)
    folders = {}
    for family in ("deepfloyd-if", "deepfloyd-if-ii"):
        folders[family] = random_weights.write_pipeline(family, tmp_path / family, progress=lambda _: None)
    stage_1 = diffusers.IFPipeline.from_pretrained(folders["deepfloyd-if"])
    stage_2 = diffusers.IFSuperResolutionPipeline.from_pretrained(folders["deepfloyd-if-ii"])
    assert stage_2.text_encoder is None and stage_1.text_encoder is not None
    # stage II's schedulers are the config's (convert_if.py's), not the registry's stage I scheduler
    assert stage_2.scheduler.config.sample_max_value == 1.0 and stage_1.scheduler.config.sample_max_value == 1.5
    assert stage_2.image_noising_scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert stage_2.unet.config.class_embed_type == "timestep" and stage_2.unet.config.in_channels == 6
    # --config-only: the UNet alone with weights, T5's config beside it (loaded with T5 left out)
    folder = random_weights.write_pipeline(
        "deepfloyd-if", tmp_path / "unet-only", progress=lambda _: None, config_only=("text_encoder",)
    )
    assert [f.name for f in (folder / "text_encoder").iterdir()] == ["config.json"]
    alone = diffusers.IFPipeline.from_pretrained(folder, text_encoder=None)
    assert torch.equal(alone.unet.conv_in.weight, stage_1.unet.conv_in.weight)


def test_big_models_reads_each_stages_step_time_from_the_profile():
    steps = [
        {"stage": s, "index": i, "timestep": 1.0, "sigma": None, "denoiser_ms": 1.0, "scheduler_ms": 0.1}
        for s in (1, 2)
        for i in (0, 1)
    ]
    stages = [
        {"stage": 1, "size": "64x64", "steps": 2, "median_step_ms": 12345.0, "total_ms": 25000.0},
        {"stage": 2, "size": "256x256", "steps": 2, "median_step_ms": 6500.0, "total_ms": 13000.0},
    ]
    profile = {
        "steps": steps,
        "stages": stages,
        "text_encoder_ms": 900.0,
        "load_ms": 2000.0,
        "total_ms": 40000.0,
        "mean_step_ms": 9000.0,
        "median_step_ms": 9000.0,
        "peak_rss_mb": 5000.0,
    }
    found = big_models.parse_profile(format_profile(profile))
    assert found["stage 1 step"] == 12.345 and found["stage 2 step"] == 6.5
    assert found["stage 2 size"] == "256x256" and found["model load"] == 2.0


def test_the_memory_column_is_the_largest_of_the_cascades_phases():
    model = registry.get("deepfloyd-if")
    assert footprint.need_mb(model, "fp32") == pytest.approx(4762e6 * 4 * 1.05 / MB + 200)  # T5 fp32 the peak
    assert footprint.need_mb(model, "int4") is None  # a UNet's int4 keeps its convolutions fp32
    # int8: the phases' arithmetic, within 11% of stage I's measured session peak (5,928 MB, docs/benchmarks.md)
    t5 = 4762e6 * (1 + 4 / 128) * 1.05 / MB  # T5-XXL int8
    stage_1 = 4304e6 * (1 + 4 / 128) * 1.05 / MB + 616  # IF-I-XL int8 + its activations at 64x64, batch 2
    stage_2 = 1243e6 * (1 + 4 / 128) * 1.05 / MB + 2240  # IF-II-L int8 + its activations at 256x256
    unet_3 = 473e6 * (1 + 4 / 128) * 1.05 / MB + 3584  # stage III's x4 UNet int8 + its activations (below)
    estimate = max(t5, stage_1, stage_2, unet_3) + 200
    assert footprint.need_mb(model, "int8") == pytest.approx(estimate)
    assert abs(estimate - 5928) / 5928 < 0.25
    # a measurement, where one is recorded for a format, stands in for the estimate
    measured = dataclasses.replace(model, measured_mb={"int8": 9552})
    assert footprint.need_mb(measured, "int8") == 9552 and footprint.need_mb(measured, "fp32") == pytest.approx(
        footprint.need_mb(model, "fp32")
    )


def test_the_memory_column_counts_stage_3():
    """Stage III (the x4 upscaler, exported with --stage-3) adds three phases: its CLIP (fp32), its UNet at
    256x256 latents with guidance, its VAE decode to 1024x1024 in tiles. Its counts are the upscaler's config's
    (bench/configs/deepfloyd-if-iii.json); each phase's estimate is within 25% of the peak measured at full size
    (docs/benchmarks.md, "Stage III"), and all stay under stage I's, so the column's figures hold with or without
    it; a stage III that needed more would be the figure."""
    model = registry.get("deepfloyd-if")
    spec = next(stage for stage in model.stages if stage["stage"] == 3)
    vae, _ = random_weights.meta_module("vae", random_model.config("deepfloyd-if-iii")["vae"])
    decoder = sum(p.numel() for m in (vae.decoder, vae.post_quant_conv) for p in m.parameters()) / 1e6
    counts = {
        "text_encoder": _params_m("deepfloyd-if-iii", "text_encoder"),
        "unet": _params_m("deepfloyd-if-iii", "unet"),
        "vae_decoder": decoder,
    }
    assert {name: int(count) for name, count in counts.items()} == spec["params_m"]  # M, rounded down
    clip = 340e6 * 4 * 1.05 / MB + 6  # CLIP ViT-H fp32 + one 77-token prompt
    unet = {fmt: 473e6 * size * 1.05 / MB + 3584 for fmt, size in (("fp32", 4), ("int8", 1 + 4 / 128))}
    decode = 32e6 * 4 * 1.05 / MB + 299  # the decoder fp32 + 36 tiles of 256x256 (one at a time) and the image
    measured = ((clip, 1292), (unet["fp32"], 6149), (unet["int8"], 4695), (decode, 592))
    for estimate, peak in measured:
        assert abs(estimate + 200 - peak) / peak < 0.25, (estimate + 200, peak)
    without = dataclasses.replace(model, stages=tuple(s for s in model.stages if s["stage"] != 3))
    for fmt in ("fp32", "int8"):
        assert max(clip, unet[fmt], decode) + 200 < footprint.need_mb(without, fmt) == footprint.need_mb(model, fmt)
    heavier = {**spec, "activations_mb": {**spec["activations_mb"], "denoiser": 30_000}}
    heavy = dataclasses.replace(model, stages=tuple(heavier if s is spec else s for s in model.stages))
    assert footprint.need_mb(heavy, "int8") == pytest.approx(unet["int8"] - 3584 + 30_000 + 200)


def test_a_five_level_unet_is_traced_at_multiples_of_16():
    """IF-II-L's 5 levels downsample 16x: traced at the 8-multiple cases (24x16) torch.export failed on the skip
    concatenation (24 not in VR[16, 16]); its cases are scaled to multiples of 16, 4-level UNets' kept."""
    from types import SimpleNamespace

    from exporters.components import LATENT_CASES, _unet_case

    if_ii = SimpleNamespace(block_out_channels=random_model.config("deepfloyd-if-ii")["unet"]["block_out_channels"])
    sd = SimpleNamespace(block_out_channels=[320, 640, 1280, 1280])
    for case, (batch, h, w) in LATENT_CASES.items():
        assert _unet_case(sd, case) == (batch, h, w)
        b, h2, w2 = _unet_case(if_ii, case)
        assert b == batch and h2 % 16 == 0 and w2 % 16 == 0 and (h2, w2) == (2 * h, 2 * w)


def test_the_random_upscaler_loads_in_diffusers_upscale_pipeline(tmp_path, monkeypatch):
    """Stage III's full-size config (bench/configs/deepfloyd-if-iii.json) cut to test widths, written by
    bench.random_weights and loaded by diffusers' StableDiffusionUpscalePipeline: its x4 VAE, 7-channel UNet
    with a noise-level table and its two schedulers as the pipeline takes them."""
    cfg = copy.deepcopy(random_model.config("deepfloyd-if-iii"))
    cfg["unet"].update(block_out_channels=[32, 32, 64, 64], cross_attention_dim=32, layers_per_block=1)
    cfg["vae"].update(block_out_channels=[32, 32, 64], layers_per_block=1)
    cfg["text_encoder"].update(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "deepfloyd-if-iii.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(random_model, "CONFIGS", configs)
    folder = random_weights.write_pipeline("deepfloyd-if-iii", tmp_path / "iii", progress=lambda _: None)
    stage_3 = diffusers.StableDiffusionUpscalePipeline.from_pretrained(folder)
    assert stage_3.vae_scale_factor == 4 and stage_3.vae.config.scaling_factor == 0.08333
    assert stage_3.unet.config.in_channels == 7 and stage_3.unet.class_embedding.num_embeddings == 1000
    assert stage_3.config.max_noise_level == 350
    assert (
        type(stage_3.scheduler).__name__ == "DDIMScheduler"
        and stage_3.scheduler.config.prediction_type == "v_prediction"
    )
    assert stage_3.low_res_scheduler.config.variance_type == "fixed_small"
