"""Where a UNet step's time goes: ONNX Runtime's own profiler (``enable_profiling``), summed per op type.

``python -m bench.profile_ops [--engine stepwise|ort_plain|stepwise_int8…] [--component unet|vae_decoder]``
profiles a graph of a bench engine for a few runs (guided steps at batch 2, or decodes; the first run, the
warm-up, is dropped) and prints the top op types by time.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import click
import numpy as np


def summarize(trace_path: Path, skip_runs: int = 1) -> list[dict]:
    """Per op type: total ms, share of node time, node count, from a profile written by ONNX Runtime."""
    events = json.loads(Path(trace_path).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    start = runs[skip_runs]["ts"] if len(runs) > skip_runs else 0
    totals, counts = defaultdict(float), defaultdict(int)
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        if event["ts"] < start:
            continue
        op = event.get("args", {}).get("op_name", "?")
        totals[op] += event["dur"] / 1000
        counts[op] += 1
    node_ms = sum(totals.values()) or 1.0
    kept_runs = max(len(runs) - skip_runs, 1)
    return [
        {
            "op": op,
            "ms_per_run": round(ms / kept_runs, 1),
            "share": round(ms / node_ms, 4),
            "nodes": counts[op] // kept_runs,
        }
        for op, ms in sorted(totals.items(), key=lambda kv: -kv[1])
    ]


def _feeds(session, width: int, height: int, embed_dim: int) -> dict:
    types = {i.name: i.type for i in session.get_inputs()}
    rng = np.random.default_rng(0)
    latent = (height // 8, width // 8)
    if "latent_sample" in types:  # the VAE decoder
        return {"latent_sample": rng.standard_normal((1, 4, *latent), dtype=np.float32)}
    return {
        "sample": rng.standard_normal((2, 4, *latent), dtype=np.float32),
        "timestep": np.asarray(500, np.int64 if "int64" in types["timestep"] else np.float32).reshape(()),
        "encoder_hidden_states": rng.standard_normal((2, 77, embed_dim), dtype=np.float32),
    }


def profile_graph(path: Path, threads: int, width: int, height: int, embed_dim: int, runs: int, prefix: Path) -> Path:
    import onnxruntime as ort

    from .engines.ort import session_options

    options = session_options(threads, {"profile_prefix": prefix})
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = _feeds(session, width, height, embed_dim)
    for i in range(runs + 1):
        t0 = time.perf_counter()
        session.run(None, feeds)
        click.echo(f"  run {i} ({'warm-up' if i == 0 else 'profiled'}): {time.perf_counter() - t0:.2f} s", err=True)
    return Path(session.end_profiling())


@click.command()
@click.option("--model", default="sd15", show_default=True)
@click.option("--engine", default="ort_plain", show_default=True, help="an ort_* or stepwise_* bench engine")
@click.option("--component", type=click.Choice(["unet", "vae_decoder"]), default="unet", show_default=True)
@click.option("--width", type=int, default=512, show_default=True)
@click.option("--height", type=int, default=512, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--runs", type=int, default=2, show_default=True)
@click.option("--top", type=int, default=12, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
def main(model, engine, component, width, height, threads, runs, top, json_path):
    from . import variants
    from .export import exported_folder
    from .random_model import cache_name, cache_root, source_folder

    folder = exported_folder(model)
    work = cache_root() / f"{cache_name(model)}-graphs"
    ctx = variants.Context(folder, source_folder(model), threads, width, height, 0.18215, work)
    kind, options = variants.spec(engine, ctx)
    default = {"unet": ctx.unet, "vae_decoder": ctx.vae}[component]
    if kind == "ort":
        graph = Path(options[component])
    elif kind == "stepwise":  # an export: the engine's own graphs (the default export, or a precision mode's)
        graph = Path(options["folder"]) / component / "model.onnx"
    else:
        graph = default
    embed_dim = json.loads((folder / "unet" / "config.json").read_text())["cross_attention_dim"]
    trace = profile_graph(graph, threads, width, height, embed_dim, runs, work / f"profile-{engine}-{component}")
    rows = summarize(trace)
    click.echo(f"{engine}: {graph}\n\n| op | ms per step | share | nodes |\n|---|---|---|---|")
    for row in rows[:top]:
        click.echo(f"| {row['op']} | {row['ms_per_run']:,.0f} | {100 * row['share']:.1f}% | {row['nodes']} |")
    if json_path:
        report = {"engine": engine, "component": component, "graph": str(graph), "trace": str(trace), "ops": rows}
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
