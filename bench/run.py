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
from engine import sampling

from . import flops as flop_count
from . import machine, peak, variants
from .images import max_abs_diff, psnr
from .worker import Worker, WorkerError

PROMPT = "a red apple on a wooden table, studio lighting"
NEGATIVE = ""
GUIDANCE = 7.5  # SD 1.5's; other families run at their registry model's guidance (SDXL 5, SD3 7, FLUX none)
SEED = 0
# the engines every family has; the ort_* tuning candidates and int8 modes are written for SD 1.5's UNet
FAMILY_ENGINES = ("stepwise", "pytorch", "openvino_fp32", "openvino_default")


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


class Plan:
    """The family's latent layout and schedule, from the engine's own architecture (engine/families) without
    loading a graph: latent shape, FLUX's 2x2 packing, SD3/FLUX's resolution-dependent shift."""

    def __init__(self, folder: Path, width: int, height: int):
        from engine.families import ARCHITECTURES
        from registry import manifest

        info = manifest.read(folder, check_files=False)
        self.family_name = info.family
        self.family = ARCHITECTURES[info.family](info)
        self.width, self.height = width, height
        self.denoiser = self.family.denoiser_component
        self.latent_shape = self.family.latent_shape(width, height)

    def set_timesteps(self, sched, steps: int) -> None:
        self.family.set_timesteps(sched, steps, self.width, self.height)

    def pack(self, latents):
        return self.family.pack(latents)

    def unpack(self, latents):
        return self.family.unpack(latents, self.width, self.height)


def count_flops(graphs: dict, denoiser: str) -> dict:
    """In a child process: parsing the graphs costs a few GB that the engines need more."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_count_flops, graphs, denoiser).result()


def _count_flops(graphs: dict, denoiser: str) -> dict:
    """FLOPs of each graph at the input shapes the reference engine fed it (``StepwiseEngine.graph_shapes``):
    the denoiser step (guidance batch included), the VAE decode, the text encoders for one prompt."""
    counted = {name: flop_count.count(Path(g["path"]), g["shapes"]) for name, g in graphs.items() if g["shapes"]}
    den, vae = counted[denoiser], counted.get("vae_decoder")  # no decode in a run without one
    text = {name: c for name, c in counted.items() if name.startswith("text_encoder")}
    return {
        "unet": den.total,  # the denoiser's, UNet or transformer (the key SD 1.5's JSON has always had)
        "unet_by_op": dict(den.by_op),
        "unet_unresolved": len(den.unresolved),
        "denoiser": denoiser,
        "denoiser_inputs": graphs[denoiser]["shapes"],
        "vae_decoder": vae.total if vae else None,
        "vae_unresolved": len(vae.unresolved) if vae else None,
        "text_encoder": sum(c.total for c in text.values()),
        "text_encoders": {name: c.total for name, c in text.items()},
    }


def start_engine(name: str, ctx: variants.Context, progress, family: str = "sd15") -> Worker | None:
    if family != "sd15" and name not in FAMILY_ENGINES:
        progress(f"  {name}: the ORT tuning candidates and int8 modes are SD 1.5 (UNet) only; left out")
        return None
    kind, options = variants.spec(name, ctx)
    if kind in ("pytorch", "openvino", "stepwise"):  # the size: SDXL's time ids, FLUX's position ids
        options = {**options, "width": ctx.width, "height": ctx.height}
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


def _worker_denoiser(worker: Worker, cond: dict, guidance: float, raw: dict):
    """An engine process as the sampling loop's ``denoise(x, t)``; the process's own step time is noted."""

    def denoise(x, t):
        seconds, prediction = worker.call("step", x, t, cond, guidance)
        raw["steps"].append(seconds)
        return prediction

    return denoise


def _rotated(items: list, shift: int) -> list:
    shift %= max(len(items), 1)
    return items[shift:] + items[:shift]


def measure_group(
    workers: dict[str, Worker],
    folder: Path,
    plan: Plan,
    steps: int,
    repeats: int,
    ref: str,
    progress,
    guidance: float = GUIDANCE,
    decode: bool = True,
) -> dict:
    """Text encoding, warm-up + ``repeats`` denoiser steps and VAE decodes, each round alternating the
    engines in a rotated order. Every engine follows its own trajectory from the same noise. ``decode``
    False leaves the VAE out (a second reduced-depth build has the same VAE as the first)."""
    names = list(workers)
    raw = {n: {"text": [], "steps": [], "glue": [], "vae": []} for n in names}

    embeds = {}
    for name in names:  # warm-up: first-run allocations (OpenVINO: compilation) are not the encoding's cost
        _, embeds[name] = workers[name].call("encode", PROMPT, NEGATIVE, guidance)
    for r in range(repeats):
        for name in _rotated(names, r):
            seconds, embeds[name] = workers[name].call("encode", PROMPT, NEGATIVE, guidance)
            raw[name]["text"].append(seconds)
    cond = embeds[ref]  # every engine denoises with the same states: the step comparison is the denoiser's alone

    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    scheds = {n: schedulers.from_config(config) for n in names}
    for sched in scheds.values():
        plan.set_timesteps(sched, steps)
    noise = np.random.default_rng(SEED).standard_normal(plan.latent_shape, dtype=np.float32)
    total = min(repeats + 1, len(scheds[ref].timesteps))  # the first step is the warm-up, reported apart
    x = {n: plan.pack(noise * np.float32(scheds[n].init_noise_sigma)) for n in names}
    # each engine runs the engine's own loop (engine.sampling.steps) over its worker's denoiser; the rounds
    # advance the loops in turn, so engines alternate step by step
    loops = {n: sampling.steps(_worker_denoiser(workers[n], cond, guidance, raw[n]), scheds[n], x[n]) for n in names}
    for i in range(total):
        for name in _rotated(names, i):
            step, _ = next(loops[name])
            x[name] = step.latents
            # glue: the scheduler's step in this process (the worker's step time is the denoiser's)
            raw[name]["glue"].append(step.scheduler_ms / 1000)
        t = step.timestep
        progress(
            f"  step {i + 1}/{total} (t={float(t):g}): " + ", ".join(f"{n} {raw[n]['steps'][-1]:.2f}s" for n in names)
        )

    images = {n: None for n in names}
    if decode:
        for name in names:  # warm-up: first-run allocations are not the decode's cost
            _, images[name] = workers[name].call("decode", plan.unpack(x[name]))
        for r in range(repeats):
            for name in _rotated(names, r):
                seconds, images[name] = workers[name].call("decode", plan.unpack(x[name]))
                raw[name]["vae"].append(seconds)
            progress(f"  VAE decode {r + 1}/{repeats}: " + ", ".join(f"{n} {raw[n]['vae'][-1]:.2f}s" for n in names))
    for name in names:
        raw[name]["latents"], raw[name]["image"] = plan.unpack(x[name]), images[name]
    if "stepwise" in workers:
        _, raw["_graphs"] = workers["stepwise"].call("graph_shapes")
    return raw


def _summary(raw: dict, ref_raw: dict, flops: dict, peak_gflops: float | None) -> dict:
    timed = raw["steps"][1:] or raw["steps"]
    median_step = _median(timed)
    ref_step = _median(ref_raw["steps"][1:] or ref_raw["steps"])
    vae_s = _median(raw["vae"])
    gflops = flops["unet"] / median_step / 1e9
    decoded = vae_s is not None and raw["image"] is not None and ref_raw["image"] is not None
    return {
        "median_step_s": round(median_step, 4),
        "step_s": [round(s, 4) for s in timed],
        "first_step_s": round(raw["steps"][0], 4),
        "glue_ms_per_step": round(1000 * _median(raw["glue"]), 3),
        "text_encode_s": round(_median(raw["text"]), 4),
        "vae_decode_s": round(vae_s, 4) if vae_s is not None else None,
        "gflops": round(gflops, 1),
        "peak_fraction": round(gflops / peak_gflops, 3) if peak_gflops else None,
        "vae_gflops": round(flops["vae_decoder"] / vae_s / 1e9, 1) if vae_s else None,
        # against the reference engine's steps and decodes timed in the same rounds
        "ratio_to_stepwise": round(median_step / ref_step, 3),
        "vae_ratio_to_stepwise": round(vae_s / _median(ref_raw["vae"]), 3) if decoded else None,
        "latent_max_diff": round(max_abs_diff(raw["latents"], ref_raw["latents"]), 6),
        "latent_max_abs": round(float(np.max(np.abs(ref_raw["latents"]))), 4),
        "psnr_db": round(min(psnr(raw["image"], ref_raw["image"]), 999.0), 2) if decoded else None,
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
    guidance: float = GUIDANCE,
    decode: bool = True,
    progress=print,
) -> dict:
    """Time ``engines`` against ``reference``. The reference stays loaded; the others are loaded beside it
    in groups, as many at a time as leave ``min_free_mb`` of memory, so every ratio is measured in rounds
    that interleave the engine with the reference. FLOPs are counted afterwards from the ONNX graphs at the
    shapes the reference fed them (its workers gone, the memory free)."""
    if reference != "stepwise":
        raise SystemExit("the reference engine must be stepwise (its graph shapes give the FLOP count)")
    started = time.time()
    load_before = os.getloadavg()
    vae_config = json.loads((folder / "vae_decoder" / "config.json").read_text())
    plan = Plan(folder, width, height)
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
    peak_info = peak.measure(threads) if measure_peak else {"peak_gflops": None}
    progress(f"matmul peak: {peak_info}")
    peak_gflops = peak_info.get("peak_gflops")

    ref_worker = start_engine(reference, ctx, progress, plan.family_name)
    if ref_worker is None:
        raise SystemExit(f"the reference engine {reference} could not be loaded")
    pending = [e for e in engines if e != reference]
    raws, loads, groups, ref_runs, graphs = {}, {}, [], [], {}
    try:
        while True:
            group = {reference: ref_worker}
            while pending and (len(group) == 1 or machine.available_mb() > min_free_mb):
                name = pending.pop(0)
                worker = start_engine(name, ctx, progress, plan.family_name)
                if worker is not None:
                    group[name] = worker
            progress(f"timing {', '.join(group)} interleaved")
            raw = measure_group(group, folder, plan, steps, repeats, reference, progress, guidance, decode)
            graphs = raw.pop("_graphs", None) or graphs
            for name, worker in group.items():
                if name == reference:
                    continue
                rss = worker.stop()
                loads[name] = {"load_s": round(worker.load_s, 2), "peak_rss_mb": rss and round(rss, 1)}
                raws[name] = (raw[name], raw[reference])
            groups.append(list(group))
            ref_runs.append(raw[reference])
            if not pending:
                break
    finally:
        rss = ref_worker.stop()
    progress("counting FLOPs from the ONNX graphs at the shapes the engine fed them …")
    counted = count_flops(graphs, plan.denoiser)
    progress(f"  {plan.denoiser} step {counted['unet'] / 1e12:.3f} TFLOP, VAE decode {counted['vae_decoder'] or 0:.3g}")
    if measure_peak:  # the machine may be shared: the best of a measurement before and one after the run
        again = peak.measure(threads)
        progress(f"matmul peak again: {again}")
        if again["peak_gflops"] > peak_gflops:
            peak_info, peak_gflops = again, again["peak_gflops"]
    results = {}
    for name, (engine_raw, ref_raw) in raws.items():
        results[name] = dict(loads[name])
        results[name].update(_summary(engine_raw, ref_raw, counted, peak_gflops))
    # the reference: all its rounds from every group together
    merged = {key: [v for r in ref_runs for v in r[key]] for key in ("text", "glue", "vae")}
    merged["steps"] = [ref_runs[0]["steps"][0]] + [v for r in ref_runs for v in r["steps"][1:]]
    merged["latents"], merged["image"] = ref_runs[0]["latents"], ref_runs[0]["image"]
    ref_result = {"load_s": round(ref_worker.load_s, 2), "peak_rss_mb": rss and round(rss, 1)}
    ref_result.update(_summary(merged, merged, counted, peak_gflops))
    ref_result["psnr_db"] = None
    # the same engine, the same noise in every group: its runs must agree, or the comparison is off
    ref_result["latent_max_diff"] = max(max_abs_diff(r["latents"], merged["latents"]) for r in ref_runs)
    results = {reference: ref_result, **{n: results[n] for n in engines if n in results}}
    return {
        "model": model,
        "family": plan.family_name,
        "width": width,
        "height": height,
        "threads": threads,
        "steps": steps,
        "repeats": repeats,
        "guidance": guidance if plan.family.uses_cfg(guidance) else None,
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


def extrapolate(t1: float, t2: float, d1: float, d2: float, real: float) -> float:
    """The straight line through (d1, t1) and (d2, t2) at ``real``: t1 + (t2 − t1)·(real − d1)/(d2 − d1)."""
    return t1 + (t2 - t1) * (real - d1) / (d2 - d1)


def _estimate(t1: float, t2: float, f1: float, f2: float, units: tuple, real: float, peak: float | None):
    """(estimate, method) for one time measured at two depths with FLOPs f1, f2.

    ``linear``: the two-point line. It needs the two runs' machines to be alike: on a shared machine whose
    load changed between them, the slope can come out negative or imply a per-unit speed above the matmul
    peak. Then ``flops-scaled``: the deeper build's time × FLOPs(real) / FLOPs(u2), i.e. the deeper build's
    achieved speed carried to the real depth."""
    u1, u2 = units
    slope = (t2 - t1) / (u2 - u1)
    unit_flops = (f2 - f1) / (u2 - u1)
    if slope > 0 and (not peak or unit_flops / slope / 1e9 <= peak):
        return extrapolate(t1, t2, u1, u2, real), "linear"
    return t2 * extrapolate(f1, f2, u1, u2, real) / f2, "flops-scaled"


def combine_depths(model: str, reduced: dict, points: list[dict]) -> dict:
    """Two runs of reduced-depth builds (``reduced["units"]``, full width) → the real depth's estimate.

    Per engine: the step (warm-up too) and its FLOPs extrapolate along the denoiser's repeated unit to
    ``reduced["denoiser"]["real"]``, the text encoding along the text encoder's (``reduced["text"]``, when
    cut), linearly through the two points, or scaled by FLOPs from the deeper build where the two runs
    disagree (``_estimate``); the VAE (full size in both builds) and the fidelity are the first build's
    measurements; peak memory is left as the two measured points. Every combined row is an estimate; the
    runs are kept."""
    (u1, u2), (p1, p2) = reduced["units"], points
    real = reduced["denoiser"]["real"]
    text_real = reduced.get("text", {}).get("real")
    peak_gflops = max(p["peak_gflops"] or 0 for p in points) or None
    f1, f2 = p1["flops_per_step"], p2["flops_per_step"]
    tf1, tf2 = p1["text_encoder_flops"], p2["text_encoder_flops"]
    flops = extrapolate(f1, f2, u1, u2, real)
    text_flops = extrapolate(tf1, tf2, u1, u2, text_real) if text_real else tf1

    def step(a, b):
        return _estimate(a, b, f1, f2, (u1, u2), real, peak_gflops)

    def text(a, b):
        return _estimate(a, b, tf1, tf2, (u1, u2), text_real, peak_gflops) if text_real else (a, "measured")

    names = [n for n in p1["results"] if n in p2["results"]]
    ref = p1["reference"]
    results = {}
    for name in names:
        r1, r2 = p1["results"][name], p2["results"][name]
        median, method = step(r1["median_step_s"], r2["median_step_s"])
        text_s, text_method = text(r1["text_encode_s"], r2["text_encode_s"])
        gflops = flops / median / 1e9
        results[name] = {
            "estimate": True,
            "method": method,
            "text_method": text_method,
            "median_step_s": round(median, 4),
            "first_step_s": round(step(r1["first_step_s"], r2["first_step_s"])[0], 4),
            "text_encode_s": round(text_s, 4),
            "vae_decode_s": r1["vae_decode_s"],
            "vae_ratio_to_stepwise": r1["vae_ratio_to_stepwise"],
            "vae_gflops": r1["vae_gflops"],
            "gflops": round(gflops, 1),
            "peak_fraction": round(gflops / peak_gflops, 3) if peak_gflops else None,
            "glue_ms_per_step": r1["glue_ms_per_step"],
            "load_s": None,
            "load_s_points": [r1["load_s"], r2["load_s"]],
            "peak_rss_mb": None,
            "peak_rss_mb_points": [r1["peak_rss_mb"], r2["peak_rss_mb"]],
            "median_step_s_points": [r1["median_step_s"], r2["median_step_s"]],
            "ratio_to_stepwise_points": [r1["ratio_to_stepwise"], r2["ratio_to_stepwise"]],
            "latent_max_diff": max(r1["latent_max_diff"], r2["latent_max_diff"]),
            "latent_max_abs": r1["latent_max_abs"],
            "psnr_db": r1["psnr_db"],
        }
    for result in results.values():
        result["ratio_to_stepwise"] = round(result["median_step_s"] / results[ref]["median_step_s"], 3)
    return {
        **{k: p1[k] for k in ("family", "width", "height", "threads", "steps", "repeats", "guidance", "reference")},
        "model": model,
        "estimate": {
            "units": [u1, u2],
            "denoiser_real_units": real,
            "text_real_units": text_real,
            "method": "linear: t(real) = t(u1) + (t(u2) - t(u1)) * (real - u1) / (u2 - u1); flops-scaled where "
            "the two runs disagree (slope <= 0 or above the matmul peak): t(u2) * FLOPs(real) / FLOPs(u2)",
        },
        "flops_per_step": round(flops),
        "flops_per_step_points": [f1, f2],
        "vae_decode_flops": p1["vae_decode_flops"],
        "text_encoder_flops": round(text_flops),
        "peak_gflops": peak_gflops,
        "machine": p1["machine"],
        "versions": p1["versions"],
        "wall_s": round(sum(p["wall_s"] for p in points), 1),
        "load_average": [p1["load_average"][0], p2["load_average"][1]],
        "results": results,
        "points": points,
    }
