"""``python bench/ov_text2image.py IR_FOLDER --steps 20 --size 512``: OpenVINO GenAI's ``Text2ImagePipeline``.

Run with a venv that has ``openvino-genai`` (not the project's: docs/benchmarks.md, "Step caching", has the
install and the ``optimum-cli export openvino`` that writes the IR from a diffusers folder). Loads the pipeline
on CPU with its default config: the CPU plugin's default inference precision (bf16 on CPUs with AVX-512 BF16)
unless ``--precision f32``, ``--threads`` as ``INFERENCE_NUM_THREADS``, dynamic shapes unless ``--reshape``, and
the generation config the pipeline chose for the model (steps and guidance given here; its ``taylorseer_config``
is printed and left as it is unless ``--taylorseer``: ``off`` for none, ``default`` for
``openvino_genai.TaylorSeerCacheConfig()``, or ``INTERVAL,BEFORE,AFTER``).
SD 3 IR folders (``model_index.json`` names ``StableDiffusion3Pipeline``) get the prompt for all three encoders,
as diffusers and Stepwise do, and T5's window of ``--max-sequence-length`` tokens (256: Stepwise's and diffusers').
Warms up with 2 steps, then times STEPS steps at SIZE² and appends one JSON line to ``--results``: the time to
image (prompt, steps, decode: ``generate`` returns the decoded image), the load time, the count and median of
the UNet's (SD 1.5) or transformer's (SD 3) calls as its perf metrics record them,
the peak RSS (``ru_maxrss``) and the load average.

The initial noise is ``bench.step_cache``'s (``np.random.default_rng(seed).standard_normal``, the latent shape):
with ``--against IMAGE.npy`` (a Stepwise image from the same noise, ``bench.step_cache --save-images``) the row
also has the PSNR between the two engines' images, which says both ran the same model and schedule.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time
from pathlib import Path

import numpy as np

PROMPT = "a red apple on a wooden table, studio light"  # bench/step_cache.py's
# a recorded step shorter than this ran no denoiser: a predicted one (a full call takes a second or more here)
PREDICTED_STEP_MS = 10.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def is_sd3(folder: str) -> bool:
    index = Path(folder) / "model_index.json"
    return index.exists() and "StableDiffusion3" in json.loads(index.read_text()).get("_class_name", "")


def taylorseer_config(openvino_genai, text: str):
    """``off`` → None, ``default`` → TaylorSeerCacheConfig(), ``3,6,-2`` → its fields set to 3, 6 and -2."""
    if text == "off":
        return None
    if text == "default":
        return openvino_genai.TaylorSeerCacheConfig()
    interval, before, after = (int(v) for v in text.split(","))
    return new_taylorseer_config(openvino_genai, interval, before, after)


def new_taylorseer_config(openvino_genai, interval: int, before: int, after: int):
    config = openvino_genai.TaylorSeerCacheConfig()  # the Python binding's constructor takes no arguments
    config.cache_interval, config.disable_cache_before_step, config.disable_cache_after_step = interval, before, after
    return config


def main() -> None:
    import openvino as ov
    import openvino_genai

    class NumpyNoise(openvino_genai.Generator):
        """The latents bench.step_cache feeds Stepwise: one draw of the whole shape from numpy's seeded PCG64."""

        def __init__(self, seed: int) -> None:
            super().__init__()
            self.seed = seed

        def next(self) -> float:
            raise NotImplementedError("the pipeline asks only for whole tensors")

        def randn_tensor(self, shape: ov.Shape) -> ov.Tensor:
            noise = np.random.default_rng(self.seed).standard_normal(tuple(shape), dtype=np.float32)
            return ov.Tensor(noise)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="an OpenVINO IR folder written by optimum-cli export openvino")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="INFERENCE_NUM_THREADS (default: the plugin's)")
    parser.add_argument("--precision", default=None, help="INFERENCE_PRECISION_HINT (default: the plugin's)")
    parser.add_argument(
        "--reshape", action="store_true", help="static shapes (pipe.reshape before compile): not the default"
    )
    parser.add_argument(
        "--taylorseer",
        default=None,
        help="off, default (TaylorSeerCacheConfig()) or INTERVAL,BEFORE,AFTER (default: the pipeline's own config)",
    )
    parser.add_argument("--max-sequence-length", type=int, default=256, help="T5's window (SD 3 only)")
    parser.add_argument("--against", default=None, help="a uint8 image .npy from bench.step_cache --save-images")
    parser.add_argument("--label", default="openvino-genai default")
    parser.add_argument("--results", default=None, help="JSON lines to append to")
    args = parser.parse_args()

    properties = {}
    if args.threads:
        properties["INFERENCE_NUM_THREADS"] = args.threads
    if args.precision:
        properties["INFERENCE_PRECISION_HINT"] = args.precision
    start = time.perf_counter()
    if args.reshape:  # OpenVINO GenAI's documented opt-in: compile the models for one batch, size and guidance
        pipe = openvino_genai.Text2ImagePipeline(args.folder)
        pipe.reshape(1, args.size, args.size, args.guidance)
        pipe.compile("CPU", **properties)
    else:
        pipe = openvino_genai.Text2ImagePipeline(args.folder, "CPU", **properties)
    load = time.perf_counter() - start
    config = pipe.get_generation_config()
    pipeline_taylorseer = str(config.taylorseer_config)
    if args.taylorseer is not None:
        config.taylorseer_config = taylorseer_config(openvino_genai, args.taylorseer)
    precision = args.precision or ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()
    print(
        f"pipeline defaults: {config.num_inference_steps} steps, guidance {config.guidance_scale}, "
        f"taylorseer_config {pipeline_taylorseer}; inference precision {precision}; "
        f"this run's taylorseer_config {config.taylorseer_config}",
        flush=True,
    )
    common = dict(width=args.size, height=args.size, guidance_scale=args.guidance)
    if is_sd3(args.folder):
        common.update(prompt_2=PROMPT, prompt_3=PROMPT, max_sequence_length=args.max_sequence_length)
    cache = config.taylorseer_config
    if cache is not None:  # a copy: the property's object does not outlive the config's reset below
        cache = new_taylorseer_config(
            openvino_genai, cache.cache_interval, cache.disable_cache_before_step, cache.disable_cache_after_step
        )
    config.taylorseer_config = None  # the 2-step warm-up only compiles: 2 steps are inside any cache's warm-up
    pipe.set_generation_config(config)
    pipe.generate(PROMPT, num_inference_steps=2, generator=NumpyNoise(args.seed), **common)
    config.taylorseer_config = cache
    pipe.set_generation_config(config)
    start = time.perf_counter()
    result = pipe.generate(PROMPT, num_inference_steps=args.steps, generator=NumpyNoise(args.seed), **common)
    seconds = time.perf_counter() - start
    metrics = pipe.get_performance_metrics()
    raw = metrics.raw_metrics
    encoders = metrics.get_text_encoder_infer_duration()  # ms: one figure, or one per text encoder
    encoders_ms = sum(encoders.values()) if isinstance(encoders, dict) else float(encoders)
    # the UNet pipelines fill unet_inference_durations, the transformer ones transformer_inference_durations;
    # FLUX's records a TaylorSeer-predicted step too (microseconds), SD 3's only the calls it makes
    durations_ms = [d / 1000 for d in raw.unet_inference_durations or raw.transformer_inference_durations]
    unet_ms = [d for d in durations_ms if d >= PREDICTED_STEP_MS]
    image = np.array(result.data)[0]
    row = {
        "engine": f"openvino-genai {openvino_genai.__version__}",
        "label": args.label,
        "folder": args.folder,
        "size": args.size,
        "steps": args.steps,
        "guidance": args.guidance,
        "taylorseer_config": str(config.taylorseer_config),
        "pipeline_taylorseer_config": pipeline_taylorseer,
        "precision": precision,
        "threads": args.threads,
        "static_shapes": args.reshape,
        "load_s": round(load, 1),
        "time_to_image_s": round(seconds, 2),
        "unet_calls": len(unet_ms),
        "predicted_steps": len(durations_ms) - len(unet_ms),
        "median_unet_call_s": round(float(np.median(unet_ms)) / 1000, 3) if unet_ms else None,
        "text_encoder_s": round(encoders_ms / 1000, 2),
        "vae_decode_s": round(metrics.get_vae_decoder_infer_duration() / 1000, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args.against:
        row["psnr_vs_stepwise_db"] = round(psnr(image, np.load(args.against)), 2)
    print(json.dumps(row), flush=True)
    if args.results:
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
