"""Weight precision modes of graphs exported from a module in memory, with ONNX Runtime's quantization tools.

- ``--weights int8-static`` (UNets): convolutions static QDQ int8 (weights per channel, uint8 activations with
  ranges calibrated on the model's own sampling trajectory) → ``QLinearConv``; then every MatMul dynamic int8
  (activations quantized at run time from their own range) → ``DynamicQuantizeMatMul``. Both run on
  VNNI/AMX-INT8: ~0.5x the fp32 step of SD 1.5, but the export holds the whole pipeline while it samples and
  ``quantize_static``'s copies of the graph (17.2 GB for SD 1.5). Dynamic int8 *convolutions* are never used:
  ONNX Runtime runs ``ConvInteger`` on a slow generic path (2.9x slower steps). Static QDQ MatMuls were slower
  too: the calibrator leaves the MatMuls behind the fused LayerNorms fp32 and ONNX Runtime turns them into
  weight-only kernels (docs/benchmarks.md).
- ``--vae-weights int8``: the VAE decoder's convolutions the same static QDQ int8, calibrated on the decodes of
  the model's own samples, ~0.4x the fp32 decode (docs/vae-modes.md).
- ``--weights int4`` of a UNet in memory (tiny pipelines, a fused ``--unet``/``--lora``): MatMul weights 4-bit,
  block-wise (``MatMulNBits``), activations fp32, compute in int8 (accuracy level 4) where the CPU has VNNI.

A denoiser's ``--weights int8`` is weight-only and written by the streaming exporter (exporters/weights.py),
whatever the source: a quarter of the fp32 memory, exported in under 6 GB, the step 1-1.5x fp32's.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from pathlib import Path

from . import optimize
from .weights import EDGE_CHANNELS

# --weights: int8 is weight-only (exporters/weights.py), int8-static the calibrated UNet below
WEIGHTS = ("fp32", "int8", "int8-static", "int4")
VAE_WEIGHTS = ("fp32", "int8")
INT4_BLOCK = 32
# ONNX Runtime's MatMulNBits accuracy level 4: activations quantized to int8 per block, int8 dot products
INT4_ACCURACY_LEVEL = 4


def _convs(path: Path) -> tuple[list[str], list[str]]:
    """(all Conv nodes, the ones on the latent or image side: at most EDGE_CHANNELS input or output
    channels). Those stay fp32: the UNet's conv_in/conv_out, the VAE decoder's post_quant_conv, conv_in and
    conv_out. Their error goes straight into the sample or the pixels, and they cost next to nothing
    (~0.1% of the FLOPs); keeping them is worth ~1 dB on the decoded image."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = {t.name: list(t.dims) for t in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    edges = []
    for node in convs:
        weight = dims.get(node.input[1], [])  # (out, in/groups, kh, kw)
        if len(weight) == 4 and min(weight[0], weight[1]) <= EDGE_CHANNELS:
            edges.append(node.name)
    return [n.name for n in convs], edges


@contextlib.contextmanager
def lean_calibration_session(threads: int | None = None):
    """onnxruntime's calibrator runs its own session with the memory pattern on, which peaked above 10 GB on
    the SD 1.5 VAE decoder at 512x512 (docs/vae-modes.md); with it off, as the engine runs, ~5.7 GB. The
    ranges it collects are the same: only the allocation plan changes."""
    import onnxruntime
    from onnxruntime.quantization import calibrate

    original = calibrate.CalibraterBase.create_inference_session

    def create_inference_session(self):
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.enable_mem_pattern = False
        if threads:
            options.intra_op_num_threads = threads
        self.infer_session = onnxruntime.InferenceSession(
            self.augmented_model_path, sess_options=options, providers=self.execution_providers
        )

    calibrate.CalibraterBase.create_inference_session = create_inference_session
    try:
        yield
    finally:
        calibrate.CalibraterBase.create_inference_session = original


def static_int8(
    src: Path, dst: Path, samples: list[dict], exclude: list[str] = (), op_types: tuple[str, ...] = ("Conv",)
) -> None:
    """QDQ int8 of ``op_types`` (weights int8 per channel, uint8 activations with MinMax ranges over
    ``samples``) except the nodes named in ``exclude``: ``src`` → ``dst``."""
    with lean_calibration_session(), _no_preprocessing_advice():
        _quantize_static(src, dst, samples, list(exclude), list(op_types))


class _PreprocessingAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage()


@contextlib.contextmanager
def _no_preprocessing_advice():
    """quantize_static advises, on the root logger, running its pre-processing (shape inference, for models
    from other converters) first: an export's user can do nothing with that, so it is not printed."""
    advice = _PreprocessingAdvice()
    logging.getLogger().addFilter(advice)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(advice)


def _quantize_static(src: Path, dst: Path, samples: list[dict], exclude: list[str], op_types: list[str]) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(samples)

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=op_types,
        nodes_to_exclude=exclude,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=True,
        # contrib ops of the fused graph leave some tensor types to guess: all are float. (Not
        # CalibMaxIntermediateOutputs: onnxruntime 1.32 drops the collected batches instead of merging them.)
        extra_options={"DefaultTensorType": 1},
    )


def _dynamic_int8_matmul(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src),
        str(dst),
        op_types_to_quantize=["MatMul"],
        weight_type=QuantType.QInt8,
        per_channel=True,
        use_external_data_format=True,
        extra_options={"DefaultTensorType": 1},
    )


def _int4_matmul(src: Path):
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(src)), bits=4, block_size=INT4_BLOCK, is_symmetric=True, accuracy_level=INT4_ACCURACY_LEVEL
    )
    quantizer.process()
    return quantizer.model.model


@contextlib.contextmanager
def _workdir(path: Path):
    """A scratch folder beside the export's temporary folder (same disk), removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix=".quantize-", dir=path.parent.parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _static_convs(src: Path, dst: Path, samples: list[dict] | None) -> str | None:
    """The convolutions of ``src`` static QDQ int8 into ``dst``, the latent/image-side ones kept fp32; what was
    done, for the manifest, or None (``dst`` not written) when there is no calibration or nothing to quantize."""
    convs, edges = _convs(src)
    if not samples or len(convs) <= len(edges):
        return None
    static_int8(src, dst, samples, edges)
    kept = ", ".join(edges) or "none"
    return f"static QDQ int8 per channel, MinMax over {len(samples)} calibration inputs; fp32: {kept}"


def int8_convs(path: Path, data_name: str, samples: list[dict]) -> dict:
    """Static QDQ int8 for the convolutions only (the VAE decoder's fast mode); the graph rewritten in place."""
    import onnx

    with _workdir(path) as work:
        dst = work / "model.onnx"
        conv = _static_convs(path, dst, samples)
        if conv is not None:
            optimize.save(onnx.load(str(dst)), path, data_name)
    return {"weights": "int8", "conv": conv or "none (no convolution to quantize)"}


def quantize(path: Path, data_name: str, weights: str, samples: list[dict] | None) -> dict:
    """Rewrite the graph at ``path`` (weights in ``data_name`` when over 2 GB) to ``weights`` (fp32, int8-static
    or int4); returns what was done, for the manifest. ``samples``: calibration inputs for the static int8
    convolutions."""
    import onnx

    if weights not in ("fp32", "int8-static", "int4"):
        raise ValueError(f"weights {weights!r}: a UNet in memory is quantized here to fp32, int8-static or int4")
    done = {"weights": weights}
    if weights == "fp32":
        return done
    with _workdir(path) as work:
        if weights == "int4":
            model = _int4_matmul(path)
            done["matmul"] = f"MatMulNBits 4-bit, block {INT4_BLOCK}, symmetric, accuracy level {INT4_ACCURACY_LEVEL}"
        else:
            convs = work / "conv.onnx"
            conv = _static_convs(path, convs, samples)
            if conv is not None:
                done["conv"] = conv
            dst = work / "matmul" / "model.onnx"
            dst.parent.mkdir()
            _dynamic_int8_matmul(convs if conv is not None else path, dst)
            done["matmul"] = "dynamic int8 (weights per channel, activations per run)"
            model = onnx.load(str(dst))
        optimize.save(model, path, data_name)
    return done
