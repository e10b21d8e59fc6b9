"""Throughput of ``stepwise batch``: one process against a local pool against Ray actors, on the same prompts.

    python -m bench.batch_throughput MODEL_DIR --images 24 --size 128 [--steps N --force] [--no-ray]

Each configuration runs ``stepwise batch`` in its own process into its own fresh folder (so nothing is
skipped), one after the other, and its closing line (images, seconds, images/minute, model loads included)
is collected into a Markdown table. Ray's own start-up is not in its figure; its actors' start-up is.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [  # (label, options)
    ("1 process × 2 threads", ["--workers", "1", "--threads", "2"]),
    ("1 process × 1 thread", ["--workers", "1", "--threads", "1"]),
    ("2 processes × 1 thread", ["--workers", "2", "--threads", "1"]),
    ("Ray, 2 actors × 1 CPU", ["--ray", "auto", "--actors", "2", "--threads", "1"]),
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    prompts = work / "prompts.jsonl"
    rows = [{"prompt": f"a lighthouse at dusk, study {i}", "seed": i, "size": args.size} for i in range(args.images)]
    for row in rows:
        if args.steps:
            row["steps"] = args.steps
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "STEPWISE_GRAPH_CACHE": "0", "PYTHONPATH": str(ROOT)}
    print("| configuration | images | seconds | images/minute | vs 1 process × 2 threads |\n|---|---|---|---|---|")
    base = None
    for index, (label, options) in enumerate(CONFIGS):
        if args.no_ray and "--ray" in options:
            continue
        command = [sys.executable, str(ROOT / "cli.py"), "batch", str(prompts), "--model", args.model]
        command += ["--out", str(work / f"out{index}"), *options] + (["--force"] if args.force else [])
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        found = re.search(r"(\d+) images in ([\d.]+) s: ([\d.]+) images/minute", done.stdout)
        if done.returncode or not found:
            print(f"| {label} | failed: {(done.stderr.strip().splitlines() or ['?'])[-1]} | | | |")
            continue
        per_minute = float(found.group(3))
        base = base or per_minute
        print(
            f"| {label} | {found.group(1)} | {float(found.group(2)):.1f} (wall {wall:.1f}) | {per_minute:.1f} | "
            f"{per_minute / base:.2f}× |",
            flush=True,
        )


if __name__ == "__main__":
    main()
