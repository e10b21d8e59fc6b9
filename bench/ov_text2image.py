"""``python bench/ov_text2image.py IR_FOLDER STEPS SIZE``: OpenVINO GenAI's ``Text2ImagePipeline`` with its defaults.

Run with a venv that has ``openvino-genai`` (not the project's: docs/benchmarks.md, "Step caching", has the
install and the ``optimum-cli export openvino`` that writes the IR from a diffusers folder). Loads the pipeline
on CPU with its default config (the CPU plugin's default inference precision: bf16 on CPUs with AVX-512 BF16),
warms it up with 2 steps, then times STEPS steps at SIZE² from seed 0 and prints one JSON line: the time to
image, the load time, the peak RSS and the load average; the image is saved beside the folder as ``.npy``.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import numpy as np

PROMPT = "a red apple on a wooden table, studio light"  # bench/step_cache.py's


def main() -> None:
    import openvino as ov
    import openvino_genai

    folder, steps, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    start = time.perf_counter()
    pipe = openvino_genai.Text2ImagePipeline(folder, "CPU")
    load = time.perf_counter() - start
    config = pipe.get_generation_config()
    precision = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    print(f"defaults: {config.num_inference_steps} steps, taylorseer_config {config.taylorseer_config}, {precision}")
    common = dict(width=size, height=size, guidance_scale=7.5, rng_seed=0)
    pipe.generate(PROMPT, num_inference_steps=2, **common)
    start = time.perf_counter()
    image = pipe.generate(PROMPT, num_inference_steps=steps, **common)
    seconds = time.perf_counter() - start
    row = {
        "engine": f"openvino-genai {openvino_genai.__version__}",
        "folder": folder,
        "size": size,
        "steps": steps,
        "precision": str(precision),
        "load_s": round(load, 1),
        "time_to_image_s": round(seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(json.dumps(row), flush=True)
    np.save(folder.rstrip("/") + f"-image-{steps}.npy", np.array(image.data))


if __name__ == "__main__":
    main()
