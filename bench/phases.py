"""Resident vs phased (engine/memory.py): peak memory and time of ``stepwise generate`` under each load policy.

    python -m bench.phases --model sd15 --width 512 --height 512 --steps 2
    stepwise bench --phases --model sd15 --steps 2                              # the same

Each policy runs ``cli.py generate`` in a fresh process on the bench's export of ``--model`` (or ``--folder``)
with the same seed, ``--force`` and ``--profile-json``; ``phased`` adds ``--low-memory``, ``resident`` runs as
the memory plan chooses it (``--available-mb`` sets what the plan sees). Per run: the plan's estimate (the
``Memory:`` line), the peak RSS as the child's profile says (``peak_rss_mb``) and as the kernel says at its
exit (``wait4``'s ru_maxrss, what ``/usr/bin/time -v`` prints), the wall time from process start to exit
(imports and loading included) and the CPU time it used (steadier than wall time on a shared machine),
``load_ms`` and each phase's time, and its RSS every 0.1 s. Both images must be the same pixels.
A graph cache that is not written yet is written first by an untimed ``phased`` run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ("resident", "phased")
PROMPT = "a red apple on a wooden table"
# the plan's line (engine/memory.py MemoryPlan.describe): "Memory:   phased, ~3,923 MB at 512x512 (why)[; VAE …]"
MEMORY_LINE = re.compile(r"^Memory:\s+(\w+), ~([\d,]+) MB(?: at \d+x\d+)? \((.*?)\)(?:;.*)?$", re.M)


def _generate(folder: Path, policy: str, args: dict, work: Path, env: dict) -> dict:
    """One ``generate`` in a fresh process; the row of the table."""
    png, prof, log = (work / f"{policy}.{ext}" for ext in ("png", "json", "log"))
    cmd = [sys.executable, str(ROOT / "cli.py"), "generate", PROMPT, "--model", str(folder), "--force"]
    cmd += ["--out", str(png), "--profile-json", str(prof)]
    cmd += [f"--{k}={v}" for k, v in args.items() if v is not None]
    cmd += ["--low-memory"] if policy == "phased" else []
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    trace = []  # [seconds since start, VmRSS MB, RssAnon MB] every 0.1 s: where in the run the peak is
    with open(log, "w") as out:
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            trace.append([round(time.perf_counter() - start, 1), *_rss_mb(child.pid)])
            time.sleep(0.1)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    if child.returncode:
        raise click.ClickException(f"{policy}: exit {child.returncode}\n{' '.join(cmd)}\n{text[-2000:]}")
    plan = MEMORY_LINE.search(text)
    p = json.loads(prof.read_text())
    return {
        "policy": policy,
        "plan_policy": plan.group(1),
        "plan_estimate_mb": float(plan.group(2).replace(",", "")),
        "plan_reason": plan.group(3),
        "peak_rss_mb": p["peak_rss_mb"],
        "peak_rss_mb_wait4": round(usage.ru_maxrss / 1024, 1),
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "load_s": round(p["load_ms"] / 1000, 2),
        "text_encoder_s": round(p["text_encoder_ms"] / 1000, 3),
        "step_s": [round((s["denoiser_ms"] + s["scheduler_ms"]) / 1000, 2) for s in p["steps"]],
        "median_step_s": round(p["median_step_ms"] / 1000, 2),
        "vae_decode_s": round(p["vae_decode_ms"] / 1000, 2),
        "total_s": round(p["total_ms"] / 1000, 2),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "rss_trace_mb": _thin(trace),
        "command": " ".join(cmd),
        "image": str(png),
    }


def _rss_mb(pid: int) -> list[int]:
    """[VmRSS, RssAnon] in MB: the rest of the RSS is file-backed (the graph cache's mapped weights)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS:", "RssAnon:")))
        return [round(int(fields[k].split()[0]) / 1024) for k in ("VmRSS", "RssAnon")]
    except (OSError, KeyError, ValueError):
        return [0, 0]


def _thin(trace: list, points: int = 300) -> list:
    """At most ``points`` samples, each the highest of its stretch (so the peaks stay)."""
    n = max(1, -(-len(trace) // points))
    return [max(trace[i : i + n], key=lambda p: p[1]) for i in range(0, len(trace), n)]


def _pixels(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _cache_written(folder: Path, manifest) -> bool:
    from engine.session import cache_enabled, cache_entry

    paths = [manifest.component_path(name) for name in manifest.components]
    return not cache_enabled() or all(cache_entry(p).is_dir() for p in paths)


def measure(folder: Path, args: dict, work: Path, available_mb=None, repeats: int = 1, progress=print) -> dict:
    """Both policies on ``folder`` (``args``: generate's --seed, --steps, --width, ...), ``repeats`` rounds;
    the JSON's content."""
    from engine.session import cache_enabled
    from registry import manifest as manifest_format

    from . import machine

    manifest = manifest_format.read(folder)
    env = dict(os.environ)
    if available_mb is not None:
        env["STEPWISE_AVAILABLE_MB"] = str(available_mb)
    work.mkdir(parents=True, exist_ok=True)
    warmup = None
    if not _cache_written(folder, manifest):
        progress("writing the graph cache: one untimed phased run")
        (work / "warmup").mkdir(exist_ok=True)
        warmup = _generate(folder, "phased", args, work / "warmup", env)
        progress(f"  peak RSS {warmup['peak_rss_mb']:,.0f} MB, wall {warmup['wall_s']:.1f} s")
    runs = []
    for round_ in range(repeats):
        for policy in POLICIES[round_ % 2 :] + POLICIES[: round_ % 2]:  # the order alternates per round
            progress(f"{policy}: {folder.name}, " + ", ".join(f"{k} {v}" for k, v in args.items() if v is not None))
            (work / str(round_)).mkdir(exist_ok=True)
            runs.append({"round": round_, **_generate(folder, policy, args, work / str(round_), env)})
            progress(f"  peak RSS {runs[-1]['peak_rss_mb']:,.0f} MB, wall {runs[-1]['wall_s']:.1f} s")
    a, b = (_pixels(r["image"]) for r in runs[:2])
    same = all(_pixels(r["image"]).tobytes() == a.tobytes() for r in runs[2:])
    return {
        "folder": str(folder),
        "args": args,
        "available_mb_override": available_mb,
        "machine": machine.describe(),
        "versions": machine.versions(),
        "components_mb": {n: round(manifest.weights_bytes([n]) / 2**20, 1) for n in sorted(manifest.components)},
        "graph_cache": cache_enabled(),
        "identical_images": same and a.shape == b.shape and a.tobytes() == b.tobytes(),
        "max_pixel_diff": int(np.abs(a.astype(int) - b.astype(int)).max()) if a.shape == b.shape else None,
        "runs": runs,
        "warmup": warmup,  # the run that wrote the graph cache, when one did
    }


def table(data: dict) -> str:
    head = "| round | policy | plan: policy, estimate MB | peak RSS MB (profile / wait4) | measured ÷ estimate "
    head += "| wall s | CPU s | load s | text s | step s (median) | VAE s | total s (load excluded) | load avg |"
    lines = [head, "|" + "---|" * 13]
    for r in data["runs"]:
        lines.append(
            f"| {r['round']} | {r['policy']} | {r['plan_policy']}, {r['plan_estimate_mb']:,.0f} "
            f"| {r['peak_rss_mb']:,.0f} / {r['peak_rss_mb_wait4']:,.0f} "
            f"| {r['peak_rss_mb'] / r['plan_estimate_mb']:.2f} | {r['wall_s']:.1f} | {r['cpu_s']:.0f} "
            f"| {r['load_s']:.1f} "
            f"| {r['text_encoder_s']:.2f} | {r['median_step_s']:.2f} | {r['vae_decode_s']:.2f} | {r['total_s']:.1f} "
            f"| {r['load_average'][0]:.1f}–{r['load_average'][1]:.1f} |"
        )
    same = "identical" if data["identical_images"] else f"DIFFERENT (max pixel diff {data['max_pixel_diff']})"
    weights = ", ".join(f"{k} {v:,.0f}" for k, v in data["components_mb"].items())
    cache = "on" if data["graph_cache"] else "off"
    return "\n".join(lines) + f"\n\nimages: {same}; graph cache {cache}; weights MB: {weights}"


def run(
    model, folder, width, height, steps, guidance, seed, threads, available_mb, json_path, repeats=1, variant="fp32"
) -> dict:
    say = lambda m: click.echo(m, err=True)  # noqa: E731
    if folder is None:
        from .export import exported_folder

        folder = exported_folder(model, say, variant)
    else:
        variant = None  # an export of its own
    args = {"seed": seed, "steps": steps, "guidance": guidance, "width": width, "height": height}
    args["threads"] = threads
    with tempfile.TemporaryDirectory(prefix="stepwise-phases-") as work:
        measured = measure(Path(folder), args, Path(work), available_mb, repeats, say)
    data = {"model": model, "variant": variant, **measured}
    for r in data["runs"] + [data["warmup"] or {}]:
        r.pop("image", None)
    click.echo(table(data))
    if json_path:
        Path(json_path).write_text(json.dumps(data, indent=2) + "\n")
        say(f"wrote {json_path}")
    return data


@click.command()
@click.option("--model", default="sd15", show_default=True, help="random:<family>[@u<N>] or tiny:<family>")
@click.option("--variant", default="fp32", show_default=True, help="the bench export of --model (bench/export.py)")
@click.option("--folder", type=click.Path(file_okay=False, exists=True, path_type=Path), help="an export instead")
@click.option("--width", type=int, help="[the export's]")
@click.option("--height", type=int, help="[the export's]")
@click.option("--steps", type=int, default=2, show_default=True)
@click.option("--guidance", type=float, help="[the model's]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, help="[physical cores]")
@click.option("--available-mb", type=float, help="the memory the plan sees (STEPWISE_AVAILABLE_MB) [MemAvailable]")
@click.option("--repeats", type=int, default=1, show_default=True, help="rounds of both, the order alternating")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
def main(model, variant, folder, width, height, steps, guidance, seed, threads, available_mb, repeats, json_path):
    """Peak RSS and time of `stepwise generate`, resident vs phased, each in a fresh process."""
    run(model, folder, width, height, steps, guidance, seed, threads, available_mb, json_path, repeats, variant)


if __name__ == "__main__":
    main()
