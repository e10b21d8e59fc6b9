"""One benchmark run: every engine loaded in its own process, then text encoding, denoiser steps and VAE
decodes timed in rounds that alternate the engines (the machine is shared: interleaving spreads any
disturbance over all of them), each engine following its own sampling trajectory from the same noise, so
the steps double as the fidelity measurement."""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import time
from pathlib import Path

import numpy as np

import schedulers

from . import flops as flop_count
from . import machine, peak, variants
from .images import max_abs_diff, psnr
from .worker import Worker, WorkerError

PROMPT = "a red apple on a wooden table, studio lighting"
NEGATIVE = ""
GUIDANCE = 7.5
SEED = 0


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def count_flops(folder: Path, width: int, height: int, embed_dim: int) -> dict:
    """In a child process: parsing the graphs costs a few GB that the engines need more."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_count_flops, folder, width, height, embed_dim).result()


def _count_flops(folder: Path, width: int, height: int, embed_dim: int) -> dict:
    h, w = height // 8, width // 8
    unet = flop_count.count(
        folder / "unet" / "model.onnx",
        {"sample": (2, 4, h, w), "timestep": (), "encoder_hidden_states": (2, 77, embed_dim)},
    )
    vae = flop_count.count(folder / "vae_decoder" / "model.onnx", {"latent_sample": (1, 4, h, w)})
    text = flop_count.count(folder / "text_encoder" / "model.onnx", {"input_ids": (1, 77)})
    return {
        "unet": unet.total,
        "unet_by_op": dict(unet.by_op),
        "unet_unresolved": len(unet.unresolved),
        "vae_decoder": vae.total,
        "vae_unresolved": len(vae.unresolved),
        "text_encoder": text.total,
    }


def start_engine(name: str, ctx: variants.Context, progress) -> Worker | None:
    kind, options = variants.spec(name, ctx)
    progress(f"loading {name} ({kind}) … [{machine.available_mb():,.0f} MB available]")
    worker = Worker(name, kind, options)
    try:
        worker.wait_ready()
    except WorkerError as exc:
        progress(f"  {name}: {str(exc).strip().splitlines()[-1]}; left out")
        worker.stop()
        return None
    progress(f"  {name} ready in {worker.load_s:.1f} s, {worker.peak_rss_mb:,.0f} MB peak so far")
    return worker


def _rotated(items: list, shift: int) -> list:
    shift %= max(len(items), 1)
    return items[shift:] + items[:shift]


def measure_group(
    workers: dict[str, Worker], folder: Path, latent_shape: tuple, steps: int, repeats: int, ref: str, progress
) -> dict:
    """Text encoding, warm-up + ``repeats`` denoiser steps and VAE decodes, each round alternating the
    engines in a rotated order. Every engine follows its own trajectory from the same noise."""
    names = list(workers)
    raw = {n: {"text": [], "steps": [], "glue": [], "vae": []} for n in names}

    embeds = {}
    for r in range(repeats):
        for name in _rotated(names, r):
            seconds, embeds[name] = workers[name].call("encode", PROMPT, NEGATIVE)
            raw[name]["text"].append(seconds)
    cond = embeds[ref]  # every engine denoises with the same states: the step comparison is the UNet's alone

    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    scheds = {n: schedulers.from_config(config) for n in names}
    for sched in scheds.values():
        sched.set_timesteps(steps)
    timesteps = list(scheds[ref].timesteps)
    noise = np.random.default_rng(SEED).standard_normal(latent_shape, dtype=np.float32)
    x = {n: noise * np.float32(scheds[n].init_noise_sigma) for n in names}
    total = min(repeats + 1, len(timesteps))  # the first step is the warm-up, reported apart
    for i in range(total):
        t = timesteps[i]
        for name in _rotated(names, i):
            sched = scheds[name]
            g0 = time.perf_counter()
            x_in = sched.scale_model_input(x[name], t)
            g1 = time.perf_counter()
            seconds, eps = workers[name].call("step", x_in, t, cond, GUIDANCE)
            g2 = time.perf_counter()
            x[name] = sched.step(eps, t, x[name]).prev_sample
            g3 = time.perf_counter()
            raw[name]["steps"].append(seconds)
            raw[name]["glue"].append((g1 - g0) + (g3 - g2))
        progress(f"  step {i + 1}/{total} (t={t}): " + ", ".join(f"{n} {raw[n]['steps'][-1]:.2f}s" for n in names))

    images = {}
    for name in names:  # warm-up: first-run allocations are not the decode's cost
        _, images[name] = workers[name].call("decode", x[name])
    for r in range(repeats):
        for name in _rotated(names, r):
            seconds, images[name] = workers[name].call("decode", x[name])
            raw[name]["vae"].append(seconds)
        progress(f"  VAE decode {r + 1}/{repeats}: " + ", ".join(f"{n} {raw[n]['vae'][-1]:.2f}s" for n in names))
    for name in names:
        raw[name]["latents"], raw[name]["image"] = x[name], images[name]
    return raw


def _summary(raw: dict, ref_raw: dict, flops: dict, peak_gflops: float | None) -> dict:
    timed = raw["steps"][1:] or raw["steps"]
    median_step = _median(timed)
    ref_step = _median(ref_raw["steps"][1:] or ref_raw["steps"])
    vae_s = _median(raw["vae"])
    gflops = flops["unet"] / median_step / 1e9
    return {
        "median_step_s": round(median_step, 4),
        "step_s": [round(s, 4) for s in timed],
        "first_step_s": round(raw["steps"][0], 4),
        "glue_ms_per_step": round(1000 * _median(raw["glue"]), 3),
        "text_encode_s": round(_median(raw["text"]), 4),
        "vae_decode_s": round(vae_s, 4),
        "gflops": round(gflops, 1),
        "peak_fraction": round(gflops / peak_gflops, 3) if peak_gflops else None,
        "vae_gflops": round(flops["vae_decoder"] / vae_s / 1e9, 1),
        # against the reference engine's steps and decodes timed in the same rounds
        "ratio_to_stepwise": round(median_step / ref_step, 3),
        "vae_ratio_to_stepwise": round(vae_s / _median(ref_raw["vae"]), 3),
        "latent_max_diff": round(max_abs_diff(raw["latents"], ref_raw["latents"]), 6),
        "latent_max_abs": round(float(np.max(np.abs(ref_raw["latents"]))), 4),
        "psnr_db": round(min(psnr(raw["image"], ref_raw["image"]), 999.0), 2),
    }


def run(
    *,
    model: str,
    folder: Path,
    source: Path,
    work: Path,
    width: int,
    height: int,
    steps: int,
    threads: int,
    repeats: int,
    engines: list[str],
    reference: str = "stepwise",
    measure_peak: bool = True,
    min_free_mb: float = 15_000,
    progress=print,
) -> dict:
    """Time ``engines`` against ``reference``. The reference stays loaded; the others are loaded beside it
    in groups, as many at a time as leave ``min_free_mb`` of memory, so every ratio is measured in rounds
    that interleave the engine with the reference."""
    started = time.time()
    load_before = os.getloadavg()
    vae_config = json.loads((folder / "vae_decoder" / "config.json").read_text())
    ctx = variants.Context(
        folder=folder,
        source=source,
        threads=threads,
        width=width,
        height=height,
        scaling_factor=float(vae_config.get("scaling_factor", 0.18215)),
        work=work,
        progress=progress,
    )
    embed_dim = json.loads((folder / "unet" / "config.json").read_text())["cross_attention_dim"]
    progress("counting FLOPs from the ONNX graphs …")
    counted = count_flops(folder, width, height, embed_dim)
    progress(
        f"  UNet step (batch 2) {counted['unet'] / 1e12:.3f} TFLOP, VAE decode {counted['vae_decoder'] / 1e12:.3f}"
    )
    peak_info = peak.measure(threads) if measure_peak else {"peak_gflops": None}
    progress(f"matmul peak: {peak_info}")
    peak_gflops = peak_info.get("peak_gflops")

    latent_shape = (1, 4, height // 8, width // 8)
    ref_worker = start_engine(reference, ctx, progress)
    if ref_worker is None:
        raise SystemExit(f"the reference engine {reference} could not be loaded")
    pending = [e for e in engines if e != reference]
    results, groups, ref_runs = {}, [], []
    try:
        while True:
            group = {reference: ref_worker}
            while pending and (len(group) == 1 or machine.available_mb() > min_free_mb):
                name = pending.pop(0)
                worker = start_engine(name, ctx, progress)
                if worker is not None:
                    group[name] = worker
            progress(f"timing {', '.join(group)} interleaved")
            raw = measure_group(group, folder, latent_shape, steps, repeats, reference, progress)
            for name, worker in group.items():
                if name == reference:
                    continue
                rss = worker.stop()
                results[name] = {"load_s": round(worker.load_s, 2), "peak_rss_mb": rss and round(rss, 1)}
                results[name].update(_summary(raw[name], raw[reference], counted, peak_gflops))
            groups.append(list(group))
            ref_runs.append(raw[reference])
            if not pending:
                break
    finally:
        rss = ref_worker.stop()
    if measure_peak:  # the machine may be shared: the best of a measurement before and one after the run
        again = peak.measure(threads)
        progress(f"matmul peak again: {again}")
        if again["peak_gflops"] > peak_gflops:
            peak_info, peak_gflops = again, again["peak_gflops"]
    # the reference: all its rounds from every group together
    merged = {key: [v for r in ref_runs for v in r[key]] for key in ("text", "glue", "vae")}
    merged["steps"] = [ref_runs[0]["steps"][0]] + [v for r in ref_runs for v in r["steps"][1:]]
    merged["latents"], merged["image"] = ref_runs[0]["latents"], ref_runs[0]["image"]
    ref_result = {"load_s": round(ref_worker.load_s, 2), "peak_rss_mb": rss and round(rss, 1)}
    ref_result.update(_summary(merged, merged, counted, peak_gflops))
    for result in results.values():  # the peak may have risen with the second measurement
        result["peak_fraction"] = round(result["gflops"] / peak_gflops, 3) if peak_gflops else None
    ref_result["psnr_db"] = None
    # the same engine, the same noise in every group: its runs must agree, or the comparison is off
    ref_result["latent_max_diff"] = max(max_abs_diff(r["latents"], merged["latents"]) for r in ref_runs)
    results = {reference: ref_result, **{n: results[n] for n in engines if n in results}}
    return {
        "model": model,
        "width": width,
        "height": height,
        "threads": threads,
        "steps": steps,
        "repeats": repeats,
        "guidance": GUIDANCE,
        "reference": reference,
        "groups": groups,
        "flops_per_step": counted["unet"],
        "vae_decode_flops": counted["vae_decoder"],
        "text_encoder_flops": counted["text_encoder"],
        "flops_detail": counted,
        "peak_gflops": peak_gflops,
        "peak": peak_info,
        "machine": machine.describe(),
        "versions": machine.versions(),
        "wall_s": round(time.time() - started, 1),
        # other work on the machine during the run: the 1-minute load average before and after
        "load_average": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "results": results,
    }
