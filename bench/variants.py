"""The named engines a run can time: the comparison (``stepwise``, ``pytorch``, ``openvino_fp32``,
``openvino_default``), the tuning candidates of our ONNX Runtime path (``ort_*``) and the fast precision
modes (``stepwise_int8``, …). Each name → (engine kind, options), built from the run's context."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import graphs

COMPARISON = ("stepwise", "pytorch", "openvino_fp32", "openvino_default")
# the best fp32 tuning candidate and the fastest precision mode found so far (docs/benchmarks.md)
TUNED = ("ort_fused_mha",)
FAST_MODES = ("stepwise_int8_mha", "stepwise_int8_hybrid")


@dataclass
class Context:
    folder: Path  # the exported model
    source: Path  # the diffusers pipeline it was exported from
    threads: int
    width: int
    height: int
    scaling_factor: float
    work: Path  # where derived graphs are cached
    progress: object = print

    @property
    def unet(self) -> Path:
        return self.folder / "unet" / "model.onnx"

    @property
    def vae(self) -> Path:
        return self.folder / "vae_decoder" / "model.onnx"

    def ort(self, unet=None, vae=None, **options) -> tuple[str, dict]:
        spec = {
            "unet": str(unet or self.unet),
            "vae_decoder": str(vae or self.vae),
            "text_encoder": str(self.folder / "text_encoder" / "model.onnx"),
            "threads": self.threads,
            "scaling_factor": self.scaling_factor,
        }
        return "ort", {**spec, **options}


def _static_dims(ctx: Context) -> tuple[dict, dict]:
    """optimum's symbolic dimension names fixed to this run's shapes: (UNet options, VAE options)."""
    h, w = ctx.height // 8, ctx.width // 8
    unet = {"batch_size": 2, "height": h, "width": w, "sequence_length": 77}
    vae = {"batch_size": 1, "latent_height": h, "latent_width": w}
    return {"free_dims": unet}, {"free_dims": vae}


def _int8(
    ctx: Context, op_types: tuple[str, ...], name: str, vae_ops: tuple[str, ...] | None = None, fused: bool = False
):
    source = ctx.unet
    if fused:  # the attention-fused graph with MultiHeadAttention everywhere (ort_fused_mha)
        source = graphs.split_self_attention(graphs.fused_unet(ctx.unet, ctx.work), ctx.work, ctx.progress)
    unet = graphs.dynamic_int8(source, ctx.work, name, op_types, "unet", ctx.progress)
    vae = graphs.dynamic_int8(ctx.vae, ctx.work, name, vae_ops, "vae_decoder", ctx.progress) if vae_ops else None
    return ctx.ort(unet=unet, vae=vae)


def _static_int8(ctx: Context, op_types: tuple[str, ...], name: str, dynamic_after: tuple[str, ...] = ()):
    source = graphs.split_self_attention(graphs.fused_unet(ctx.unet, ctx.work), ctx.work, ctx.progress)
    samples = lambda: graphs.unet_calibration_samples(ctx.folder, ctx.width, ctx.height, CALIBRATION_PROMPT)  # noqa: E731
    unet = graphs.static_int8(source, ctx.work, name, op_types, samples, ctx.progress)
    if dynamic_after:  # then the remaining ops quantized at run time (MatMul: U8S8 with activations' own ranges)
        unet = graphs.dynamic_int8(unet, ctx.work, f"{name}+dynamic", dynamic_after, "unet", ctx.progress)
    return ctx.ort(unet=unet)


CALIBRATION_PROMPT = "a red apple on a wooden table, studio lighting"

BUILDERS = {
    "stepwise": lambda c: (
        "stepwise",
        {"folder": str(c.folder), "threads": c.threads, "width": c.width, "height": c.height},
    ),
    "pytorch": lambda c: ("pytorch", {"source": str(c.source), "threads": c.threads}),
    "openvino_fp32": lambda c: (
        "openvino",
        {
            "folder": str(c.folder),
            "threads": c.threads,
            "width": c.width,
            "height": c.height,
            "scaling_factor": c.scaling_factor,
            "precision": "f32",
        },
    ),
    "openvino_default": lambda c: (
        "openvino",
        {
            "folder": str(c.folder),
            "threads": c.threads,
            "width": c.width,
            "height": c.height,
            "scaling_factor": c.scaling_factor,
            "precision": None,
        },
    ),
    # --- tuning candidates: one change each against the engine's session
    "ort_plain": lambda c: c.ort(),
    "ort_no_spin": lambda c: c.ort(options={"config": {"session.intra_op.allow_spinning": "0"}}),
    "ort_mem_pattern": lambda c: c.ort(options={"mem_pattern": True}),  # the engine's setting before 19b5ab4
    "ort_no_arena": lambda c: c.ort(options={"cpu_arena": False}),
    "ort_basic_opt": lambda c: c.ort(options={"graph_level": "basic"}),
    "ort_extended_opt": lambda c: c.ort(options={"graph_level": "extended"}),
    "ort_static_dims": lambda c: c.ort(options=_static_dims(c)[0], vae_options=_static_dims(c)[1]),
    "ort_split_guidance": lambda c: c.ort(split_guidance=True),
    "ort_io_binding": lambda c: c.ort(io_binding=True),
    "ort_fused": lambda c: c.ort(unet=graphs.fused_unet(c.unet, c.work, c.progress)),
    "ort_fused_mha": lambda c: c.ort(
        unet=graphs.split_self_attention(graphs.fused_unet(c.unet, c.work, c.progress), c.work, c.progress)
    ),
    # --- fast precision modes
    "stepwise_int8": lambda c: _int8(c, ("MatMul",), "int8-matmul"),
    "stepwise_int8_conv": lambda c: _int8(c, ("MatMul", "Conv"), "int8-matmul-conv", vae_ops=("Conv",)),
    "stepwise_int8_static": lambda c: _static_int8(c, ("Conv", "MatMul"), "int8-static-qdq"),
    "stepwise_int8_hybrid": lambda c: _static_int8(c, ("Conv",), "int8-static-conv", dynamic_after=("MatMul",)),
    "stepwise_int8_mha": lambda c: _int8(c, ("MatMul",), "int8-mha-matmul", fused=True),
    "stepwise_int8_mha_conv": lambda c: _int8(
        c, ("MatMul", "Conv"), "int8-mha-matmul-conv", vae_ops=("Conv",), fused=True
    ),
}


def names() -> list[str]:
    return list(BUILDERS)


def spec(name: str, ctx: Context) -> tuple[str, dict]:
    if name not in BUILDERS:
        raise SystemExit(f"unknown engine '{name}'; known: {', '.join(BUILDERS)}")
    return BUILDERS[name](ctx)
