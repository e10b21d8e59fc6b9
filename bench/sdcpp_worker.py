"""The part of ``bench.sdcpp`` that runs inside stable-diffusion-cpp-python's own interpreter.

Run as a script (``SDCPP_PYTHON bench/sdcpp_worker.py convert|generate JSON``), never imported by the
product or the bench package: it needs only the standard library and ``stable_diffusion_cpp``.

- ``convert``: ``{"input", "output", "type", "rules"}`` → stable-diffusion.cpp's own converter
  (``convert(input, "", output, type, rules, convert_name=False)``: the tensor names stay as they are,
  stable-diffusion.cpp renames them when it loads the file, as it would the safetensors).
- ``generate``: ``{"model": {StableDiffusion kwargs}, "image": {generate_image kwargs}}`` → builds the
  context (timed: the load), generates (timed, with the progress callback's per-step times) and prints
  one line ``SDCPP_RESULT {json}`` on stdout, with the first image's pixel statistics (a NaN latent decodes
  to a flat image: std 0); with ``"save": PATH`` that image is written there (PNG). stable-diffusion.cpp's
  own log goes to stderr.
"""

from __future__ import annotations

import json
import sys
import time


def convert(spec: dict) -> dict:
    from stable_diffusion_cpp import stable_diffusion_cpp as lib
    from stable_diffusion_cpp.stable_diffusion import GGML_TYPE_MAP

    started = time.monotonic()
    ok = lib.convert(
        spec["input"].encode(),
        b"",
        spec["output"].encode(),
        int(GGML_TYPE_MAP[spec["type"]]),
        spec.get("rules", "").encode(),
        False,
    )
    return {"ok": bool(ok), "seconds": time.monotonic() - started}


def generate(spec: dict) -> dict:
    from stable_diffusion_cpp import StableDiffusion

    steps: list[tuple[int, float, float]] = []  # (step, its time as reported, wall clock since start)
    started = time.monotonic()
    sd = StableDiffusion(**spec["model"])
    load_s = time.monotonic() - started

    def progress(step: int, total: int, seconds: float) -> None:
        steps.append((step, seconds, time.monotonic() - gen_start))

    gen_start = time.monotonic()
    images = sd.generate_image(progress_callback=progress, **spec["image"])
    generate_s = time.monotonic() - gen_start
    stats = None
    if images:
        import numpy as np

        pixels = np.asarray(images[0].convert("RGB"), dtype=np.float64)
        stats = {
            "min": pixels.min(),
            "max": pixels.max(),
            "mean": round(pixels.mean(), 2),
            "std": round(pixels.std(), 2),
        }
        if spec.get("save"):
            images[0].save(spec["save"])
    return {
        "load_s": load_s,
        "generate_s": generate_s,
        "progress": steps,
        "images": len(images),
        "image_size": list(images[0].size) if images else None,
        "image_stats": stats,
    }


def main() -> None:
    mode, spec = sys.argv[1], json.loads(sys.argv[2])
    result = {"convert": convert, "generate": generate}[mode](spec)
    print("SDCPP_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
