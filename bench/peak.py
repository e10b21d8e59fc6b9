"""The machine's measured fp32 matmul peak: the best of several large square MatMuls, in numpy and in
ONNX Runtime (MLAS), at the benchmark's thread count. The higher of the two is the reference peak."""

from __future__ import annotations

import os
import time

import numpy as np


def _best_seconds(run, repeats: int) -> float:
    run()  # warm-up: thread pools, page faults, packing
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def numpy_gflops(n: int = 4096, threads: int = 2, repeats: int = 3) -> float:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # without it numpy's BLAS uses its own default (all cores; 2 here)
        threadpool_limits = None
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    if threadpool_limits is not None:
        with threadpool_limits(limits=threads):
            seconds = _best_seconds(lambda: a @ b, repeats)
    else:
        seconds = _best_seconds(lambda: a @ b, repeats)
    return 2 * n**3 / seconds / 1e9


def onnxruntime_gflops(n: int = 4096, threads: int = 2, repeats: int = 3) -> float:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "matmul",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {
        "a": np.random.default_rng(0).standard_normal((n, n), dtype=np.float32),
        "b": np.random.default_rng(1).standard_normal((n, n), dtype=np.float32),
    }
    seconds = _best_seconds(lambda: session.run(None, feeds), repeats)
    return 2 * n**3 / seconds / 1e9


def measure(threads: int, n: int = 4096, repeats: int = 3) -> dict:
    numpy_peak = numpy_gflops(n, threads, repeats)
    ort_peak = onnxruntime_gflops(n, threads, repeats)
    return {
        "n": n,
        "threads": threads,
        "numpy_gflops": round(numpy_peak, 1),
        "onnxruntime_gflops": round(ort_peak, 1),
        "peak_gflops": round(max(numpy_peak, ort_peak), 1),
        "cpu_count": os.cpu_count(),
    }
