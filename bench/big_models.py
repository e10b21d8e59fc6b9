"""``python -m bench.big_models``: the full-size big models on this machine, from random bf16 checkpoints.

For each model: write its random diffusers folder (``random_weights``: bf16 shards, as the hub ships them),
export it with ``stepwise export`` in the given weight formats, then ``stepwise generate`` ``--steps`` steps
(default 1; qwen-image needs 2: its scheduler's ``shift_terminal`` stretches a lone sigma by 0/0) at each
size. Every stage runs as its own process, its peak RSS read from the kernel (``wait4``'s ``ru_maxrss``),
its wall time measured here. One JSON line per stage is appended to ``--results`` and a Markdown table is
printed. The source folder is deleted after the export unless ``--keep-source`` (disk: FLUX.1's is 31 GiB).

    python -m bench.big_models flux-schnell:int4:int8 sd3-medium:fp32:int8 sd3.5-large:int4:int8 --sizes 512 1024
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

from . import random_model
from .sdcpp import run_child  # one child runner for both engines: wall time and wait4's peak RSS


def run(cmd: list[str], log: Path) -> dict:
    """Run ``cmd``, its output to ``log``; wall seconds, peak RSS (MB) and exit status."""
    rc, seconds, peak_mb, _ = run_child(cmd, log)
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(peak_mb), "rc": rc}


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


PROFILE = {
    "model load": re.compile(r"^model load\s+([\d.]+) ms", re.M),
    "text encoding": re.compile(r"^text encoding\s+([\d.]+) ms", re.M),
    "step": re.compile(r"^median per step\s+([\d.]+) s", re.M),
    "decode": re.compile(r"^VAE decode\s+([\d.]+) ms", re.M),
    "memory": re.compile(r"^Memory:\s+(.*)$", re.M),
}
# a cascade's per-stage line (DeepFloyd IF): "stage 1 (64x64)  2 steps, median 12.345 s/step, 25.00 s"
STAGE_LINE = re.compile(r"^stage (\d+) \((\S+)\)\s+(\d+) steps, median ([\d.]+) s/step", re.M)


def parse_profile(text: str) -> dict:
    found = {}
    for key, pattern in PROFILE.items():
        match = pattern.search(text)
        if match:
            value = match.group(1)
            found[key] = value if key == "memory" else float(value) / (1 if key == "step" else 1000)
    for stage, size, _, seconds in STAGE_LINE.findall(text):
        found[f"stage {stage} step"] = float(seconds)
        found[f"stage {stage} size"] = size
    return found


def write_source(family: str, root: Path, save, stage: str = "build") -> Path | None:
    """``root/random-FAMILY-src`` written by ``bench.random_weights`` unless complete (its result saved as
    ``stage``); None if that failed."""
    source = root / f"random-{family}-src"
    if not (source / random_model.DONE).is_file():
        built = run([sys.executable, "-m", "bench.random_weights", family, "--out", str(source)], root / "build.log")
        save(stage, {**built, "disk_gb": round(folder_bytes(source) / 2**30, 2) if source.is_dir() else 0})
        if built["rc"] != 0:
            return None
    return source


def bench_model(
    spec: str,
    sizes: list[int],
    root: Path,
    results: Path,
    keep_source: bool,
    flags: list[str],
    say=print,
    steps: int = 1,
) -> None:
    model, weights, text_weights = (spec.split(":") + ["fp32", "fp32"])[:3]
    stepwise = [str(Path(sys.executable).with_name("stepwise"))]
    source = root / f"random-{model}-src"
    out = root / f"random-{model}-{weights}-t5{text_weights}"
    record = {"model": model, "weights": weights, "text_encoder_weights": text_weights}

    def save(stage: str, data: dict) -> None:
        line = {**record, "stage": stage, **data, "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with open(results, "a") as handle:
            handle.write(json.dumps(line) + "\n")
        say(json.dumps(line))

    # a cascade (DeepFloyd IF): the config names its stage II's config, written to its own folder
    stage_2 = random_model.config(model).get("stage_2")
    if not (out / "stepwise.json").is_file():
        say(f"writing random:{model} → {source}")
        sources = [write_source(model, root, save)]
        if stage_2:
            say(f"writing random:{stage_2} (stage II)")
            sources.append(write_source(stage_2, root, save, "build stage 2"))
        if None in sources:
            return
        say(f"exporting {source} ({weights}, T5 {text_weights}) → {out}")
        registry_id = model.partition("@")[0]  # a reduced build (flux-dev@u1) carries its model's policy
        cmd = [*stepwise, "export", str(source), "--model", registry_id, "--out", str(out), "--weights", weights]
        cmd += ["--stage-2", str(sources[1])] if stage_2 else []
        exported = run([*cmd, "--text-encoder-weights", text_weights], root / f"export-{model}.log")
        if exported["rc"] != 0:
            save("export", {**exported, "log": str(root / f"export-{model}.log")})
            return
        save("export", {**exported, "disk_gb": round(folder_bytes(out) / 2**30, 2)})
        if not keep_source:
            for folder in sources:
                shutil.rmtree(folder, ignore_errors=True)
    for size in sizes:
        log = root / f"generate-{model}-{size}.log"
        cmd = [*stepwise, "generate", "a lighthouse at dusk", "--model", str(out), "--steps", str(steps), "--force"]
        cmd += ["--width", str(size), "--height", str(size), "--seed", "1", "--profile"]
        cmd += ["--out", str(root / f"{model}-{size}.png"), *flags]
        cmd += ["--steps-2", str(steps)] if stage_2 else []  # stage II's steps as stage I's
        generated = run(cmd, log)
        save(f"generate {size}", {**generated, "flags": " ".join(flags), **parse_profile(log.read_text())})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="MODEL[:WEIGHTS[:T5_WEIGHTS]], e.g. flux-schnell:int4:int8")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--root", type=Path, default=random_model.cache_root())
    parser.add_argument("--results", type=Path, default=None, help="JSON lines (default: ROOT/big-models.jsonl)")
    parser.add_argument("--keep-source", action="store_true")
    parser.add_argument("--steps", type=int, default=1, help="denoising steps per generate (qwen-image: 2)")
    parser.add_argument("--low-memory", action="store_true", help="generate with the phased load policy")
    args = parser.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    results = args.results or args.root / "big-models.jsonl"
    for spec in args.models:
        flags = ["--low-memory"] if args.low_memory else []
        bench_model(spec, args.sizes, args.root, results, args.keep_source, flags, steps=args.steps)


if __name__ == "__main__":
    main()
