"""`stepwise models`' memory column (registry/footprint.py) against the arithmetic done by hand."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

import cli
import registry
from registry import footprint

MB = 2**20


def test_flux_schnell_int4_is_its_denoiser_phase():
    model = registry.get("flux-schnell")
    # transformer 11,901 M parameters at 4.25 bits (0.5 byte + a float32 scale per 128), x1.25 once loaded
    # (repacked), plus the engine's activation estimate at 1024x1024 (1,224 MB), plus 200 MB of runtime
    transformer = 11_901e6 * (0.5 + 4 / 128) * 1.25 / MB + 1224
    # CLIP-L fp32 + T5-XXL int8 (the int4 column keeps T5 at int8): smaller, so the transformer phase is the peak
    text = (123e6 * 4 + 4_762e6 * (1 + 4 / 128)) * 1.05 / MB
    assert transformer > text
    assert footprint.need_mb(model, "int4") == pytest.approx(transformer + 200)


def test_sd3_medium_fp32_is_its_text_phase():
    model = registry.get("sd3-medium")
    text = (123e6 + 695e6 + 4_762e6) * 4 * 1.05 / MB  # CLIP-L, CLIP-G, T5-XXL, all fp32
    assert footprint.need_mb(model, "fp32") == pytest.approx(text + 200)


def test_qwen_image_int4_is_its_transformer_phase():
    model = registry.get("qwen-image")
    transformer = 20_430e6 * (0.5 + 4 / 128) * 1.25 / MB  # int4 MatMulNBits, repacked on load
    assert footprint.need_mb(model, "int4") == pytest.approx(transformer + 1296 + 200)
    text = 8_292e6 * (1 + 4 / 128) * 1.05 / MB  # Qwen2.5-VL in int8, the int4 column's text encoder
    assert text < transformer


def test_hidream_int4_is_its_text_phase():
    """Its four encoders are one phase: T5-XXL and Llama-3.1-8B in int8 with both CLIPs in fp32 outweigh the
    int4 transformer and its activations (17,110 M at 4.25 bits, x1.25, + 2,100 MB at 1024² with CFG)."""
    model = registry.get("hidream-i1")
    text = ((4_762e6 + 8_030e6) * (1 + 4 / 128) + (123e6 + 695e6) * 4) * 1.05 / MB
    transformer = 17_110e6 * (0.5 + 4 / 128) * 1.25 / MB + 2100
    assert text > transformer
    assert footprint.need_mb(model, "int4") == pytest.approx(text + 200)


def test_unet_int4_has_no_figure_and_unexportable_models_none():
    assert footprint.need_mb(registry.get("sd15"), "int4") is None
    no_estimate = dataclasses.replace(registry.get("hidream-i1"), activations_mb=None)  # as a model without an engine
    assert footprint.need_mb(no_estimate, "int4") is None
    sdxl = registry.get("sdxl")  # int8: the UNet at ~1 byte a weight; the 1024x1024 decode then dominates
    decode = 84e6 * 4 * 1.05 / MB + sdxl.activations_mb["decode"]
    assert footprint.need_mb(sdxl, "int8") == pytest.approx(
        max(decode, 2567e6 * (1 + 4 / 128) * 1.05 / MB + 1120) + 200
    )


def test_models_command_shows_memory_per_format():
    result = CliRunner().invoke(cli.main_group, ["models"])
    assert result.exit_code == 0
    flux = next(line for line in result.output.splitlines() if " flux-schnell " in line)
    need = [footprint.need_mb(registry.get("flux-schnell"), f) / 1024 for f in ("fp32", "int8", "int4")]
    assert "/".join(f"{gb:.0f}" for gb in need) in flux
    assert "a cascade's largest stage, its optional stage III (--stage-3) included" in " ".join(result.output.split())
    rows = json.loads(CliRunner().invoke(cli.main_group, ["models", "--json"]).output)
    assert {r["id"]: r["memory_mb"]["int4"] for r in rows}["sd15"] is None
