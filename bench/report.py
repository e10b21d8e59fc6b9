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
    return ref["median_step_s"] * result["ratio_to_stepwise"], ref["vae_decode_s"] * result["vae_ratio_to_stepwise"]


def total_seconds(data: dict, name: str, steps: int) -> float:
    """The guide's arithmetic: text encoding + steps × step time + VAE decode (normalized times)."""
    step_s, vae_s = normalized(data, name)
    return data["results"][name]["text_encode_s"] + steps * step_s + vae_s


def _fmt(value, pattern="{:.2f}"):
    return "–" if value is None else pattern.format(value)


def tables(data: dict) -> str:
    steps = data["steps"]
    peak = data.get("peak_gflops")
    lines = [
        f"{data['model']} {data['width']}×{data['height']}, guidance batch 2, {data['threads']} threads; "
        f"UNet step {data['flops_per_step'] / 1e12:.3f} TFLOP, VAE decode {data['vae_decode_flops'] / 1e12:.3f} TFLOP; "
        f"fp32 matmul peak {_fmt(peak, '{:.0f}')} GFLOP/s; medians of {data['repeats']} (first step apart)",
        "",
        "| engine | step s | × stepwise | GFLOP/s | % peak | first step s | text s | VAE s | VAE × stepwise "
        f"| {steps} steps s* | peak RSS MB | latent max diff | PSNR dB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in data["results"].items():
        lines.append(
            f"| {name} | {r['median_step_s']:.2f} | {r['ratio_to_stepwise']:.2f} | {r['gflops']:.0f} "
            f"| {_fmt(r['peak_fraction'] and 100 * r['peak_fraction'], '{:.0f}')} | {r['first_step_s']:.2f} "
            f"| {r['text_encode_s']:.3f} | {r['vae_decode_s']:.2f} | {r['vae_ratio_to_stepwise']:.2f} "
            f"| {total_seconds(data, name, steps):.1f} | {_fmt(r.get('peak_rss_mb'), '{:,.0f}')} "
            f"| {r['latent_max_diff']:.2g} | {_fmt(r['psnr_db'], '{:.1f}')} |"
        )
    lines += [
        "",
        "× stepwise: medians against the reference's rounds in the same interleaved group. "
        f"*text + {steps} × step + VAE, on the reference's time scale (ratio × reference median).",
    ]
    return "\n".join(lines)


def write_json(data: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
