"""``python -m bench.fidelity``: int8 and int4 against fp32 on a full-width, reduced-depth random checkpoint.

The checkpoint (``random_weights``: bf16 shards) is exported three times — transformer and T5-XXL both fp32,
both int8, and the transformer int4 with T5 int8 (T5-XXL in int4 fails the export's 10 dB floor on these random
weights: 7.0 dB) — and each export generates from the same noise, prompt and steps. Printed: the PSNR of
each decoded image against the fp32 export's, and the signal-to-noise ratio of each component's output
against PyTorch fp32 that the export's validation measured (on a reduced-depth build of one block per stack).

    python -m bench.fidelity flux-schnell@u1 --size 512 --steps 2
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from . import random_model, random_weights

FORMATS = (("fp32", "fp32"), ("int8", "int8"), ("int4", "int8"))  # (transformer, T5-XXL)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float(10 * np.log10(255.0**2 / mse)) if mse else float("inf")


def main(argv: list[str] | None = None) -> None:
    import engine
    import exporters

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", help="e.g. flux-schnell@u1, sd3-medium@u2")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--root", type=Path, default=random_model.cache_root() / "fidelity")
    parser.add_argument("--keep", action="store_true", help="keep the source and the exports")
    args = parser.parse_args(argv)
    root = args.root / args.family.replace("@", "-")
    source = root / "src"
    if not (source / random_model.DONE).is_file():
        random_weights.write_pipeline(args.family, source)
    model = random_model.config(args.family)["registry_model"]
    images, rows = {}, []
    for fmt, t5 in FORMATS:
        out = root / f"{fmt}-t5{t5}"
        if not (out / "stepwise.json").is_file():
            exporters.export(str(source), out=out, model_id=model, weights=fmt, text_encoder_weights=t5, progress=print)
        manifest = json.loads((out / "stepwise.json").read_text())
        pipe = engine.load_pipeline(out, threads=2, policy="phased")
        shape = pipe.family.latent_shape(args.size, args.size)
        noise = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        guidance = 0.0 if model.startswith("flux") else 5.0
        result = pipe.generate(
            prompt="a lighthouse at dusk",
            steps=args.steps,
            guidance=guidance,
            width=args.size,
            height=args.size,
            seed=0,
            latents=noise,
        )
        images[fmt] = result.image
        snr = {
            name: entry["validation"].get("snr_db")
            for name, entry in manifest["components"].items()
            if entry.get("weights") and entry["weights"]["format"] != "fp32"
        }
        rows.append((f"{fmt} / {t5}", fmt, snr))
        del pipe
        if not args.keep and fmt != "fp32":
            shutil.rmtree(out)
    print(f"\n{args.family}, {args.size}x{args.size}, {args.steps} steps, the same noise and prompt:\n")
    print("| weights (transformer / T5) | image PSNR against fp32 | validation SNR against PyTorch fp32 |")
    print("|---|---|---|")
    for label, fmt, snr in rows:
        value = "–" if fmt == "fp32" else f"{psnr(images[fmt], images['fp32']):.1f} dB"
        detail = ", ".join(f"{n} {v:.1f} dB" for n, v in snr.items() if v is not None) or "–"
        print(f"| {label} | {value} | {detail} |")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
