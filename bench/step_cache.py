"""``python -m bench.step_cache FOLDER``: time to image with each step cache against none, in one run.

One pipeline (resident) generates the same prompt from the same noise, seed and steps, once without a cache
and once with each ``--cache`` mode; every session a mode runs is created and warmed up (two steps) before
any timing, so the times are the generations' own: prompt, steps and decode (``total_ms`` of the profile,
which leaves session creation out). For each mode: how many steps ran the whole denoiser, the time to image,
the speed-up over no cache, the median full step, and how far the image is from the uncached one (PSNR of
the 8-bit images, and of the final latents). The uncached run is repeated after the modes (``off (again)``;
``--no-repeat-off`` skips it where runs around this one bracket it) and the speed-ups are against the mean of
the two, so a machine whose load changed during the run shows as two
different ``off`` times rather than as a speed-up. Each row also records the machine's load average when the
run ended and the process's peak RSS so far (``ru_maxrss``: it only grows, so the first row that needs more
memory shows it). ``--policy phased`` loads each phase's graphs for the generation and releases them after
(the load time is left out of ``total_ms``), so the whole denoiser and its split are never held together: what
lets SDXL's fp32 UNet (10 GB, and 10 GB more for its split) run beside the uncached one on a 24 GB machine. One
JSON line per run is appended to ``--results`` and a Markdown table is printed.

    python -m bench.step_cache /work/bigrun/stepcache/flux-dev-u1 --size 512 --steps 30 \\
        --modes fbcache magcache taylorseer:use_lite_mode=true

Random weights say little about how a mode changes a real image's look: the distance here is a distance,
not a judgement of quality (docs/benchmarks.md cites the published figures).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time
from pathlib import Path

import numpy as np

PROMPT = "a red apple on a wooden table, studio light"


def psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def _median_other_step(prof: dict) -> float | None:
    """The median cached/predicted step (denoiser + scheduler), in seconds: what a skipped step still costs."""
    other = [s["denoiser_ms"] + s["scheduler_ms"] for s in prof["steps"] if s.get("cache", "computed") != "computed"]
    return round(float(np.median(other)) / 1000, 3) if other else None


def main(argv: list[str] | None = None) -> None:
    import engine
    from registry import cache as step_cache

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an export (with --cache-graphs for the split modes)")
    parser.add_argument("--modes", nargs="*", default=["fbcache", "magcache", "taylorseer:use_lite_mode=true"])
    parser.add_argument("--steps", type=int, default=None, help="default: the registry model's default")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--policy", choices=("resident", "phased"), default="resident", help="phased: one denoiser form in memory"
    )
    parser.add_argument("--results", type=Path, default=None, help="JSON lines to append to")
    parser.add_argument(
        "--no-repeat-off", action="store_true", help="skip the bracketing uncached run (when another run brackets it)"
    )
    parser.add_argument("--save-images", type=Path, default=None, help="a folder for each run's image (uint8 .npy)")
    args = parser.parse_args(argv)

    import registry

    policy = engine.RESIDENT if args.policy == "resident" else engine.PHASED
    pipe = engine.load_pipeline(args.folder, threads=args.threads, policy=policy)
    model = registry.find(pipe.manifest.model_id or "") if pipe.manifest.model_id else None
    steps = args.steps or (model.default_steps if model else 20)
    guidance = args.guidance if args.guidance is not None else (model.guidance if model else 5.0)
    w = h = args.size
    modes = [step_cache.parse(text).resolved(steps) for text in args.modes]
    specs = [None, *modes] + ([] if args.no_repeat_off else [None])
    noise = np.random.default_rng(args.seed).standard_normal(pipe.family.latent_shape(w, h), dtype=np.float32)
    common = dict(prompt=PROMPT, guidance=guidance, width=w, height=h, seed=args.seed, latents=noise)

    print(f"warming up ({len(modes) + 1} runs of 2 steps) …", flush=True)
    for spec in [None, *modes]:  # every session created and run once before timing
        pipe.generate(steps=2, cache=None if spec is None else spec.resolved(2), **common)

    rows, base = [], None
    for number, spec in enumerate(specs):
        label = ("off" if number == 0 else "off (again)") if spec is None else spec.label()
        print(f"{label}: {steps} steps at {w}x{h} …", flush=True)
        start = time.perf_counter()
        result = pipe.generate(steps=steps, cache=spec, **common)
        wall = time.perf_counter() - start
        prof = result.profile
        full = prof.get("cache_steps", {}).get("computed", steps)
        row = {
            "model": pipe.model_label,
            "folder": str(args.folder),
            "size": w,
            "steps": steps,
            "cache": label,
            "run": number,
            "full_steps": full,
            "time_to_image_s": round(prof["total_ms"] / 1000, 2),
            "wall_s": round(wall, 2),
            "median_full_step_s": round(prof["median_full_step_ms"] / 1000, 3),
            "median_other_step_s": _median_other_step(prof),
            # outside the steps, not cached: what decides a race between engines that cache alike
            "text_encoder_s": round(prof["text_encoder_ms"] / 1000, 2),
            "vae_decode_s": round(prof["vae_decode_ms"] / 1000, 2),
            "threads": args.threads,
            "policy": args.policy,
            "load_average_1m": round(os.getloadavg()[0], 2),
            "peak_rss_mb_so_far": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if base is None:
            base = result
        else:
            row["psnr_image_db"] = round(psnr(result.image, base.image, 255.0), 2)
            peak = float(np.max(np.abs(base.latents)))
            row["psnr_latents_db"] = round(psnr(result.latents, base.latents, peak), 2)
        if args.save_images:
            args.save_images.mkdir(parents=True, exist_ok=True)
            name = "".join(c if c.isalnum() else "-" for c in label)
            np.save(args.save_images / f"run{number}-{name}.npy", result.image)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.results:
            with open(args.results, "a") as f:
                f.write(json.dumps(row) + "\n")

    off = float(np.mean([row["time_to_image_s"] for row, spec in zip(rows, specs, strict=True) if spec is None]))
    print()
    print("| cache | full steps | time to image | speed-up | full step | PSNR image | PSNR latents | load | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        speed = off / row["time_to_image_s"]
        image = f"{row['psnr_image_db']:.1f} dB" if "psnr_image_db" in row else "–"
        latents = f"{row['psnr_latents_db']:.1f} dB" if "psnr_latents_db" in row else "–"
        print(
            f"| `{row['cache']}` | {row['full_steps']} of {steps} | {row['time_to_image_s']:.1f} s | {speed:.2f}× | "
            f"{row['median_full_step_s']:.2f} s | {image} | {latents} | {row['load_average_1m']:.1f} | "
            f"{row['peak_rss_mb_so_far']:,} MB |"
        )


if __name__ == "__main__":
    main()
