"""Start-up: how long the UNet session takes to create as the engine creates it, and from a graph that
ONNX Runtime already optimised and saved (``optimized_model_filepath``), plus the first step of each.

``python -m bench.startup [--model sd15]`` (one process, sequential: start-up is not a per-step cost).

``python -m bench.startup --fresh 2`` times the engine's own graph cache (``engine.session.Graph``) instead,
each load in a fresh process, round by round: ``plain`` (``STEPWISE_GRAPH_CACHE=0``, the engine before the
cache), ``cold`` (no cache: the engine's session also saves its optimised graph), ``warm`` (cache present),
and the alternative design ``cold-extended``/``warm-extended`` (save at EXTENDED in a session of its own,
then load that at ALL). ``--steps N`` adds N UNet steps after each load and compares the last output with
``plain``'s. The graph is loaded from a temporary folder of hard links to the export's files, so the
cache is written there and the export itself is never touched.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np


def _session(path: Path, threads: int, options: dict):
    import onnxruntime as ort

    from .engines.ort import session_options

    t0 = time.perf_counter()
    session = ort.InferenceSession(str(path), session_options(threads, options), providers=["CPUExecutionProvider"])
    return session, time.perf_counter() - t0


def _first_step(session, embed_dim: int, latent: tuple[int, int]) -> float:
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((2, 4, *latent), dtype=np.float32),
        "timestep": np.asarray(500, np.float32).reshape(()),
        "encoder_hidden_states": rng.standard_normal((2, 77, embed_dim), dtype=np.float32),
    }
    t0 = time.perf_counter()
    session.run(None, feeds)
    return time.perf_counter() - t0


def measure(unet: Path, work: Path, threads: int, embed_dim: int, latent: tuple[int, int], progress=print) -> dict:
    saved = work / "ort-optimized" / "unet" / "model.onnx"
    saved.parent.mkdir(parents=True, exist_ok=True)
    for old in saved.parent.glob("model.onnx*"):
        old.unlink()
    rows = {}
    session, seconds = _session(unet, threads, {})
    rows["engine as is (ORT_ENABLE_ALL at load)"] = {
        "load_s": seconds,
        "first_step_s": _first_step(session, embed_dim, latent),
    }
    del session
    # "extended", not "all": the saved graph keeps the portable ops; layout (NCHWc) is redone at load
    options = {
        "graph_level": "extended",
        "optimized_model_filepath": saved,
        "config": {
            "session.optimized_model_external_initializers_file_name": "model.onnx.data",
            "session.optimized_model_external_initializers_min_size_in_bytes": "1024",
        },
    }
    session, seconds = _session(unet, threads, options)
    rows["saving the optimised graph (once)"] = {"load_s": seconds}
    del session
    session, seconds = _session(saved, threads, {"graph_level": "all"})
    rows["from the saved graph"] = {"load_s": seconds, "first_step_s": _first_step(session, embed_dim, latent)}
    for name, row in rows.items():
        progress(f"  {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()))
    return rows


# --- the engine's graph cache, one fresh process per load ------------------------------------------------

FRESH_MODES = ("plain", "cold", "warm", "cold-extended", "warm-extended")


def _child(mode: str, unet: Path, threads: int, steps: int = 0, save: Path | None = None) -> dict:
    """One load in this (fresh) process, then ``steps`` UNet steps; the parent prepares the cache state."""
    if mode in ("plain", "cold", "warm"):
        from engine.session import Graph

        t0 = time.perf_counter()
        session = Graph(unet, threads).session
        seconds = time.perf_counter() - t0
    else:  # the alternative design: save at EXTENDED in a session of its own, then load that at ALL
        import onnxruntime as ort

        from engine.session import session_options

        saved = unet.parent / ".ort-extended" / unet.name
        t0 = time.perf_counter()
        if mode == "cold-extended":
            options = session_options(threads)
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            options.optimized_model_filepath = str(saved)
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", unet.name + ".data"
            )
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            ort.InferenceSession(str(unet), options, providers=["CPUExecutionProvider"])  # dropped at once
        session = ort.InferenceSession(str(saved), session_options(threads), providers=["CPUExecutionProvider"])
        seconds = time.perf_counter() - t0
    row = {"mode": mode, "load_s": seconds}
    if steps:
        config = json.loads((unet.parent / "config.json").read_text())
        latent = (config["sample_size"], config["sample_size"])
        row["step_s"] = [_first_step(session, config["cross_attention_dim"], latent) for _ in range(steps)]
        if save:
            rng = np.random.default_rng(0)
            feeds = {
                "sample": rng.standard_normal((2, 4, *latent), dtype=np.float32),
                "timestep": np.asarray(500, np.float32).reshape(()),
                "encoder_hidden_states": rng.standard_normal((2, 77, config["cross_attention_dim"]), dtype=np.float32),
            }
            np.save(save, session.run(None, feeds)[0])
    row["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return row


def measure_fresh(
    unet: Path, work: Path, threads: int, rounds: int, modes=FRESH_MODES, steps: int = 0, progress=print
) -> list:
    linked = work / f"graph-cache-{os.getpid()}" / unet.parent.name
    shutil.rmtree(linked.parent, ignore_errors=True)
    linked.mkdir(parents=True)
    for file in unet.parent.iterdir():
        if file.is_file() and not file.name.startswith("."):
            os.link(file, linked / file.name)  # same inode and mtime: nothing is written to the export
    graph = linked / unet.name
    rows = []
    try:
        for r in range(rounds):
            for mode in modes:
                if mode == "cold":
                    shutil.rmtree(linked / ".ort-cache", ignore_errors=True)
                if mode == "cold-extended":
                    shutil.rmtree(linked / ".ort-extended", ignore_errors=True)
                    (linked / ".ort-extended").mkdir()
                env = {**os.environ, "STEPWISE_GRAPH_CACHE": "0" if mode == "plain" else "1"}
                cmd = [sys.executable, "-m", "bench.startup", "--child", mode, "--path", str(graph)]
                cmd += ["--threads", str(threads), "--steps", str(steps)]
                if steps:
                    cmd += ["--save", str(linked.parent / f"out-{mode}-{r}.npy")]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                row = {"round": r, **json.loads(out.stdout.strip().splitlines()[-1])}
                if steps and mode != "plain" and (linked.parent / f"out-plain-{r}.npy").is_file():
                    reference = np.load(linked.parent / f"out-plain-{r}.npy")
                    row["max_abs_diff_vs_plain"] = float(
                        np.abs(np.load(linked.parent / f"out-{mode}-{r}.npy") - reference).max()
                    )
                rows.append(row)
                extra = "".join(f", {k} {v}" for k, v in row.items() if k in ("step_s", "max_abs_diff_vs_plain"))
                progress(f"  round {r} {mode}: load {row['load_s']:.1f} s, peak RSS {row['peak_rss_gb']:.2f} GB{extra}")
    finally:
        shutil.rmtree(linked.parent, ignore_errors=True)
    return rows


@click.command()
@click.option("--model", default="sd15", show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--folder",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="An existing export to time (default: the bench's own export of --model).",
)
@click.option("--fresh", type=int, default=0, help="Rounds of the graph-cache modes, one fresh process per load.")
@click.option("--modes", default=",".join(FRESH_MODES), show_default=True, help="With --fresh: which modes.")
@click.option("--steps", type=int, default=0, help="With --fresh: UNet steps after each load (and outputs compared).")
@click.option("--child", type=click.Choice(FRESH_MODES), hidden=True)
@click.option("--path", type=click.Path(path_type=Path), hidden=True)
@click.option("--save", type=click.Path(path_type=Path), hidden=True)
def main(model, threads, json_path, folder, fresh, modes, steps, child, path, save):
    if child:
        click.echo(json.dumps(_child(child, path, threads, steps, save)))
        return
    from .export import exported_folder
    from .random_model import cache_name, cache_root

    folder = folder or exported_folder(model)
    work = cache_root() / f"{cache_name(model)}-graphs"
    if fresh:
        rows = measure_fresh(
            folder / "unet" / "model.onnx",
            work,
            threads,
            fresh,
            tuple(m for m in modes.split(",") if m),
            steps,
            progress=lambda m: click.echo(m, err=True),
        )
    else:
        config = json.loads((folder / "unet" / "config.json").read_text())
        latent = (config["sample_size"], config["sample_size"])
        rows = measure(
            folder / "unet" / "model.onnx",
            work,
            threads,
            config["cross_attention_dim"],
            latent,
            progress=lambda m: click.echo(m, err=True),
        )
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
