"""The run's results as the Markdown tables of docs/benchmarks.md, and its JSON file."""

from __future__ import annotations

import json
from pathlib import Path


def normalized(data: dict, name: str) -> tuple[float, float]:
    """(step s, VAE s) of ``name`` as its same-round ratio to the reference times the reference's median.

    Engines are timed in groups around the reference, and a shared machine is faster in one group than in
    another: the ratio, measured in interleaved rounds, is the robust number; this puts every engine on
    the reference's time scale for totals and the chart.
    """
    result, ref = data["results"][name], data["results"][data.get("reference", "stepwise")]
    vae = None
    if ref.get("vae_decode_s") is not None and result.get("vae_ratio_to_stepwise") is not None:
        vae = ref["vae_decode_s"] * result["vae_ratio_to_stepwise"]
    return ref["median_step_s"] * result["ratio_to_stepwise"], vae


def total_seconds(data: dict, name: str, steps: int) -> float | None:
    """The guide's arithmetic: text encoding + steps × step time + VAE decode (normalized times); None
    for a run that did not decode."""
    step_s, vae_s = normalized(data, name)
    if vae_s is None:
        return None
    return data["results"][name]["text_encode_s"] + steps * step_s + vae_s


def _fmt(value, pattern="{:.2f}"):
    return "–" if value is None else pattern.format(value)


def _basis(data: dict, result: dict) -> str:
    if not result.get("estimate"):
        return "measured"
    est = data["estimate"]
    how = "" if result.get("method", "linear") == "linear" else ", FLOP-scaled"
    return f"est. ({est['units'][0]}, {est['units'][1]} → {est['denoiser_real_units']} units{how})"


def _rss(result: dict) -> str:
    if result.get("peak_rss_mb") is not None:
        return f"{result['peak_rss_mb']:,.0f}"
    points = result.get("peak_rss_mb_points")
    return " / ".join(_fmt(v, "{:,.0f}") for v in points) if points else "–"


def tables(data: dict) -> str:
    steps = data["steps"]
    peak = data.get("peak_gflops")
    denoiser = data.get("flops_detail", {}).get("denoiser", "denoiser")
    if "estimate" in data:
        denoiser = "denoiser"
    guidance = "guidance batch 2" if data.get("guidance", 1) is not None else "no guidance (batch 1)"
    lines = [
        f"{data['model']} {data['width']}×{data['height']}, {guidance}, {data['threads']} threads; "
        f"{denoiser} step {data['flops_per_step'] / 1e12:.3f} TFLOP, "
        f"VAE decode {(data['vae_decode_flops'] or 0) / 1e12:.3f} TFLOP; "
        f"fp32 matmul peak {_fmt(peak, '{:.0f}')} GFLOP/s; medians of {data['repeats']} (first step apart)",
        "",
        "| engine | basis | step s | × stepwise | GFLOP/s | % peak | first step s | text s | VAE s | VAE × stepwise "
        f"| {steps} steps s* | peak RSS MB | latent max diff | PSNR dB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in data["results"].items():
        lines.append(
            f"| {name} | {_basis(data, r)} | {r['median_step_s']:.2f} | {r['ratio_to_stepwise']:.2f} "
            f"| {r['gflops']:.0f} "
            f"| {_fmt(r['peak_fraction'] and 100 * r['peak_fraction'], '{:.0f}')} | {r['first_step_s']:.2f} "
            f"| {r['text_encode_s']:.3f} | {_fmt(r['vae_decode_s'])} | {_fmt(r['vae_ratio_to_stepwise'])} "
            f"| {_fmt(total_seconds(data, name, steps), '{:.1f}')} | {_rss(r)} "
            f"| {r['latent_max_diff']:.2g} | {_fmt(r['psnr_db'], '{:.1f}')} |"
        )
    lines += [
        "",
        "× stepwise: medians against the reference's rounds in the same interleaved group. "
        f"*text + {steps} × step + VAE, on the reference's time scale (ratio × reference median).",
    ]
    if "estimate" in data:
        est = data["estimate"]
        lines.append(
            f"est.: full-width builds at {est['units'][0]} and {est['units'][1]} repeated units, each timed; step, "
            f"first step and FLOPs extrapolated linearly to the real {est['denoiser_real_units']} units"
            + (f", text encoding to {est['text_real_units']}" if est.get("text_real_units") else "")
            + "; FLOP-scaled: the two runs disagree (the machine's load changed), the deeper build's time × "
            "FLOPs(real)/FLOPs(deeper build); VAE, latent diff and PSNR measured on the first build; "
            "peak RSS: the two builds' measurements."
        )
    return "\n".join(lines)


def write_json(data: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
