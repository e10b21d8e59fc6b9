"""Start-up: how long the UNet session takes to create as the engine creates it, and from a graph that
ONNX Runtime already optimised and saved (``optimized_model_filepath``), plus the first step of each.

``python -m bench.startup [--model sd15]`` (one process, sequential: start-up is not a per-step cost).
"""

from __future__ import annotations

import json
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


@click.command()
@click.option("--model", default="sd15", show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
def main(model, threads, json_path):
    from .export import exported_folder
    from .random_model import cache_name, cache_root

    folder = exported_folder(model)
    config = json.loads((folder / "unet" / "config.json").read_text())
    latent = (config["sample_size"], config["sample_size"])
    rows = measure(
        folder / "unet" / "model.onnx",
        cache_root() / f"{cache_name(model)}-graphs",
        threads,
        config["cross_attention_dim"],
        latent,
        progress=lambda m: click.echo(m, err=True),
    )
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
