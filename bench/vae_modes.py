"""Precision modes for the VAE decoder on ONNX Runtime's CPU EP, timed in one process against the fp32 graph
(and OpenVINO's default precision when it is installed), interleaved round by round.

    python -m bench.vae_modes                       # build the variants once, then time them
    python -m bench.vae_modes --modes fp32,int8_conv_keep_io --repeats 5
    python -m bench.vae_modes --profile int8_conv   # ONNX Runtime's profiler, time per op type

Every int8 mode is ``onnxruntime.quantization.quantize_static`` on the exported fp32 decoder (QDQ, per-channel
int8 weights, uint8 activations, MinMax ranges), as ``bench/graphs.py`` ``static_int8`` does for the UNet;
the modes differ in the op types quantized and in the nodes kept in fp32 (``nodes_to_exclude``).

Latents (what the decoder is fed: latents / scaling_factor, as the engine feeds it):

- evaluation: the benchmark's fidelity latents (``python -m bench``: seed 0, the bench prompt, guidance 7.5,
  the first 4 steps of a 20-step PNDM schedule, fp32 UNet) and one held-out standard-normal latent;
- calibration: two more trajectories like it (seeds 1, 2) and two standard-normal latents (seeds 101, 102).

Trajectories are produced once, in a child process (the UNet's memory is not this process's), and cached
beside the derived graphs. Timing: one warm-up round, then ``--repeats`` rounds, each decoding the first
evaluation latent once per mode in a rotated order; ratios are medians of per-round ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .images import psnr, to_uint8

SCALING = 0.18215  # the SD 1.5 VAE's scaling_factor
TRAJECTORY_STEPS, SCHEDULE = 4, 20  # what `python -m bench --repeats 3` decodes: 4 steps of a 20-step schedule
EVAL_TRAJECTORIES, CALIB_TRAJECTORIES = (0,), (1, 2)
EVAL_NORMAL, CALIB_NORMAL = (0,), (101, 102)

IO_CONVS = ("/post_quant_conv/Conv", "/decoder/conv_in/Conv", "/decoder/conv_out/Conv")
UP_CONVS = tuple(f"/decoder/up_blocks.{i}/upsamplers.0/conv/Conv" for i in range(3))

# name: (what, op types quantized, nodes kept fp32)
MODES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "fp32": ("the exported graph (reference)", (), ()),
    "int8_conv": ("static QDQ int8, every Conv", ("Conv",), ()),
    "int8_conv_matmul": ("static QDQ int8, every Conv + the mid-block attention MatMuls", ("Conv", "MatMul"), ()),
    "int8_conv_keep_io": ("static QDQ int8 Conv; post_quant_conv, conv_in, conv_out fp32", ("Conv",), IO_CONVS),
    "int8_conv_keep_io_up": (
        "static QDQ int8 Conv; io convs and the 3 upsampler convs fp32",
        ("Conv",),
        IO_CONVS + UP_CONVS,
    ),
    "int8_conv_matmul_keep_io": (
        "static QDQ int8 Conv + MatMul; io convs fp32",
        ("Conv", "MatMul"),
        IO_CONVS,
    ),
}


def home() -> Path:
    from registry.home import stepwise_home

    return stepwise_home()


# --- latents -----------------------------------------------------------------------------------------------


def make_trajectory(source: Path, seed: int, out: Path) -> None:
    """The benchmark's sampling loop (bench/run.py measure_group) with the fp32 UNet, ``TRAJECTORY_STEPS`` steps
    of a ``SCHEDULE``-step PNDM schedule from ``seed``'s noise; the final latents saved to ``out``."""
    import onnxruntime as ort

    import schedulers
    from engine import sampling
    from engine.tokenize import PromptTokenizer

    from .run import GUIDANCE, NEGATIVE, PROMPT

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.enable_mem_pattern = False
    so.log_severity_level = 3
    cpu = ["CPUExecutionProvider"]
    text = ort.InferenceSession(str(source / "text_encoder" / "model.onnx"), so, providers=cpu)
    tokenizer = PromptTokenizer(source / "tokenizer")
    states = np.concatenate(
        [text.run(["last_hidden_state"], {"input_ids": tokenizer(t).ids})[0] for t in (NEGATIVE, PROMPT)]
    ).astype(np.float32)
    del text
    fused = source.parent / f"{source.name}-graphs" / "fused-mha" / "unet" / "model.onnx"
    unet = ort.InferenceSession(str(fused if fused.is_file() else source / "unet" / "model.onnx"), so, providers=cpu)
    types = {i.name: i.type for i in unet.get_inputs()}
    t_type = np.int64 if "int64" in types["timestep"] else np.float32
    sched = schedulers.from_config(json.loads((source / "scheduler" / "scheduler_config.json").read_text()))
    sched.set_timesteps(SCHEDULE)
    x = np.random.default_rng(seed).standard_normal((1, 4, 64, 64), dtype=np.float32) * np.float32(
        sched.init_noise_sigma
    )

    def denoise(x_in, t):
        eps = unet.run(
            None,
            {
                "sample": np.concatenate([x_in, x_in]).astype(np.float32),
                "timestep": np.asarray(t, t_type).reshape(()),
                "encoder_hidden_states": states,
            },
        )[0]
        return eps[:1] + np.float32(GUIDANCE) * (eps[1:2] - eps[:1])

    # the engine's own loop, stopped after TRAJECTORY_STEPS of the SCHEDULE (a mid-trajectory latent)
    x = sampling.sample(denoise, sched, x, callback=lambda step: step.index + 1 < TRAJECTORY_STEPS).latents
    x = x.astype(np.float32)
    np.save(out, x)


def trajectory(source: Path, work: Path, seed: int) -> np.ndarray:
    path = work / f"latents-trajectory-seed{seed}.npy"
    if not path.is_file():
        print(
            f"  sampling trajectory seed {seed} ({TRAJECTORY_STEPS}/{SCHEDULE} PNDM steps, child process)", flush=True
        )
        cmd = [sys.executable, "-m", "bench.vae_modes", "--make-trajectory", str(seed), "--source", str(source)]
        subprocess.run(cmd + ["--work", str(work)], check=True)
    return np.load(path)


def normal(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, 64, 64), dtype=np.float32)


def decoder_input(latents: np.ndarray) -> dict:
    return {"latent_sample": (np.asarray(latents, np.float32) / np.float32(SCALING)).astype(np.float32)}


# --- graphs ------------------------------------------------------------------------------------------------


def build(mode: str, source: Path, work: Path, calibration: list[dict]) -> Path:
    if mode == "fp32":
        return source
    out = work / mode / "model.onnx"
    if out.is_file():
        return out
    from exporters.quantize import static_int8

    _, op_types, exclude = MODES[mode]
    print(
        f"  quantizing {mode}: {op_types}, {len(exclude)} nodes fp32, {len(calibration)} calibration inputs", flush=True
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    static_int8(source, out, calibration, exclude=list(exclude), op_types=tuple(op_types))
    for leftover in out.parent.glob("*augmented*"):  # the calibrator's copy of the graph
        leftover.unlink()
    return out


# --- runners -----------------------------------------------------------------------------------------------


class OrtDecoder:
    def __init__(self, path: Path, threads: int, profile: bool = False):
        import onnxruntime as ort

        so = ort.SessionOptions()  # the engine's options (engine/session.py)
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.enable_mem_pattern = False
        so.log_severity_level = 3
        so.enable_profiling = profile
        if profile:
            import tempfile

            so.profile_file_prefix = str(Path(tempfile.gettempdir()) / "vae_modes_profile")
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        # every ORT session gives its arena back after a run, so that all modes fit in memory side by side
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        return self.session.run(["sample"], decoder_input(latents), self.run_options)[0]


class OpenVinoDecoder:
    """As bench/engines/openvino.py compiles it: static shapes, INFERENCE_NUM_THREADS, default precision."""

    def __init__(self, path: Path, threads: int):
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(path))
        model.reshape({"latent_sample": [1, 4, 64, 64]})
        self.request = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads}).create_infer_request()
        self.precision = str(core.get_property("CPU", "INFERENCE_PRECISION_HINT"))

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        self.request.infer(decoder_input(latents))
        return np.array(self.request.get_output_tensor(0).data)


def rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def uptime() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[:3].__str__()


def profile_ops(path: Path, threads: int, latents: np.ndarray, runs: int = 2) -> list[tuple[str, float]]:
    decoder = OrtDecoder(path, threads, profile=True)
    decoder(latents)  # warm-up, in the profile too: dropped below by run index
    for _ in range(runs):
        decoder(latents)
    trace_file = Path(decoder.session.end_profiling())
    trace = json.loads(trace_file.read_text())
    trace_file.unlink()
    run_starts = sorted(e["ts"] for e in trace if e.get("name") == "model_run")
    per_op: dict[str, float] = {}
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= run_starts[1]:
            op = e["args"].get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + e["dur"] / 1000 / runs
    return sorted(per_op.items(), key=lambda kv: -kv[1])


# --- main --------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.vae_modes", description=__doc__.splitlines()[0])
    p.add_argument("--source", type=Path, default=None, help="exported SD 1.5 folder (default: random-sd15)")
    p.add_argument("--work", type=Path, default=None, help="derived graphs and latents (default: bench/vae-modes)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, from: " + ", ".join(MODES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-openvino", action="store_true")
    p.add_argument("--profile", metavar="MODE", help="per-op-type profile of one mode instead of the timing")
    p.add_argument("--make-trajectory", type=int, metavar="SEED", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    source = args.source or home() / "bench" / "random-sd15"
    work = args.work or home() / "bench" / "vae-modes"
    work.mkdir(parents=True, exist_ok=True)
    if args.make_trajectory is not None:
        make_trajectory(source, args.make_trajectory, work / f"latents-trajectory-seed{args.make_trajectory}.npy")
        return
    vae = source / "vae_decoder" / "model.onnx"
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown modes {unknown}")

    print(f"load average before: {uptime()}", flush=True)
    evaluation = {f"trajectory seed {s}": trajectory(source, work, s) for s in EVAL_TRAJECTORIES}
    evaluation |= {f"normal seed {s}": normal(s) for s in EVAL_NORMAL}
    calibration = [decoder_input(trajectory(source, work, s)) for s in CALIB_TRAJECTORIES]
    calibration += [decoder_input(normal(s)) for s in CALIB_NORMAL]
    for name, x in evaluation.items():
        print(f"  eval latents {name}: std {x.std():.3f}, max |x| {np.abs(x).max():.2f}")
    paths = {m: build(m, vae, work, calibration) for m in (["fp32"] + [m for m in modes if m != "fp32"])}
    del calibration
    gc.collect()

    if args.profile:
        rows = profile_ops(paths[args.profile], args.threads, next(iter(evaluation.values())))
        total = sum(ms for _, ms in rows)
        print(f"\n{args.profile}: ONNX Runtime profiler, ms per decode by op type (mean of 2 after a warm-up)\n")
        print("| op type | ms | share |\n|---|---|---|")
        for op, ms in rows:
            print(f"| {op} | {ms:,.0f} | {ms / total:.0%} |")
        print(f"| **all nodes** | {total:,.0f} | |")
        return

    runners: dict[str, object] = {}
    for m, path in paths.items():
        runners[m] = OrtDecoder(path, args.threads)
        print(f"  loaded {m} ({path}), peak RSS {rss_mb():,.0f} MB", flush=True)
    if not args.no_openvino:
        try:
            runners["openvino_default"] = OpenVinoDecoder(vae, args.threads)
            print(f"  loaded openvino_default ({runners['openvino_default'].precision})", flush=True)
        except ImportError:
            print("  openvino is not installed: no OpenVINO row")
    names = list(runners)

    # fidelity (and the warm-up round): every evaluation latent through every runner
    images = {n: {k: to_uint8(runners[n](x)) for k, x in evaluation.items()} for n in names}
    quality = {n: {k: psnr(images[n][k], images["fp32"][k]) for k in evaluation} for n in names}
    print(f"  warm-up done, peak RSS {rss_mb():,.0f} MB", flush=True)

    timed = next(iter(evaluation.values()))
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            runners[n](timed)
            times[n].append(time.perf_counter() - t0)
        print(f"  round {r + 1}/{args.repeats}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names), flush=True)

    def ratio(n: str, ref: str) -> float | None:
        if ref not in times:
            return None
        return statistics.median(a / b for a, b in zip(times[n], times[ref], strict=True))

    print(f"load average after: {uptime()}; peak RSS {rss_mb():,.0f} MB\n")
    keys = list(evaluation)
    print(
        f"VAE decode 512x512 (1, 4, 64, 64), {args.threads} threads, medians of {args.repeats} interleaved rounds "
        "after a warm-up; PSNR of the uint8 image against fp32 from the same latents\n"
    )
    print(
        "| mode | what | decode s | × fp32 | × OpenVINO default | " + " | ".join(f"PSNR dB ({k})" for k in keys) + " |"
    )
    print("|---|---|---|---|---|" + "---|" * len(keys))
    for n in names:
        what = MODES[n][0] if n in MODES else f"OpenVINO CPU, default precision ({runners[n].precision})"
        ov = ratio(n, "openvino_default")
        cells = [f"{quality[n][k]:.1f}" if np.isfinite(quality[n][k]) else "identical" for k in keys]
        print(
            f"| {n} | {what} | {statistics.median(times[n]):.2f} | {ratio(n, 'fp32'):.2f} | "
            f"{'–' if ov is None else f'{ov:.2f}'} | " + " | ".join(cells) + " |"
        )
    print("\nraw seconds: " + json.dumps({n: [round(t, 3) for t in v] for n, v in times.items()}))


if __name__ == "__main__":
    main()
