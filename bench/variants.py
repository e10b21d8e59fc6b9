"""The named engines a run can time: the comparison (``stepwise``, ``pytorch``, ``openvino_fp32``,
``openvino_default``), the tuning candidates of our ONNX Runtime path (``ort_*``, each one change against
the engine) and the fast precision modes (``stepwise_int8_static``, ``stepwise_int8``, ``stepwise_int4``:
``stepwise export --weights``). Each name → (engine kind, options), built from the run's context."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import export

COMPARISON = ("stepwise", "pytorch", "openvino_fp32", "openvino_default")
# the plain export (no CPU attention fusion) under the engine's session: what the exporter's fusion gains
TUNED = ("ort_plain",)
FAST_MODES = ("stepwise_int8_static",)


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


def _plain(ctx: Context) -> Path:
    """The export without the CPU attention fusion: OpenVINO reads standard ONNX ops only. Transformer
    exports have no fusion, so they are their own plain export."""
    from registry import manifest

    components = manifest.read(ctx.folder, check_files=False).components
    if not any("fusion" in entry for entry in components.values()):
        return ctx.folder
    return export.sibling(ctx.folder, ctx.source, "fp32-plain", ctx.progress)


def _engine(ctx: Context, folder: Path) -> tuple[str, dict]:
    return "stepwise", {"folder": str(folder), "threads": ctx.threads, "width": ctx.width, "height": ctx.height}


def _openvino(ctx: Context, precision: str | None) -> tuple[str, dict]:
    options = {
        "folder": str(_plain(ctx)),
        "threads": ctx.threads,
        "width": ctx.width,
        "height": ctx.height,
        "scaling_factor": ctx.scaling_factor,
        "precision": precision,
    }
    return "openvino", options


BUILDERS = {
    "stepwise": lambda c: _engine(c, c.folder),
    "pytorch": lambda c: ("pytorch", {"source": str(c.source), "threads": c.threads}),
    "openvino_fp32": lambda c: _openvino(c, "f32"),
    "openvino_default": lambda c: _openvino(c, None),
    # --- tuning candidates: one change each against the engine's session or graph
    "ort_plain": lambda c: c.ort(unet=_plain(c) / "unet" / "model.onnx"),
    "ort_engine": lambda c: c.ort(),  # the engine's graphs and settings through the candidates' runner
    "ort_no_spin": lambda c: c.ort(options={"config": {"session.intra_op.allow_spinning": "0"}}),
    "ort_mem_pattern": lambda c: c.ort(options={"mem_pattern": True}),  # the engine's setting before 19b5ab4
    "ort_no_arena": lambda c: c.ort(options={"cpu_arena": False}),
    "ort_basic_opt": lambda c: c.ort(options={"graph_level": "basic"}),
    "ort_extended_opt": lambda c: c.ort(options={"graph_level": "extended"}),
    "ort_static_dims": lambda c: c.ort(options=_static_dims(c)[0], vae_options=_static_dims(c)[1]),
    "ort_split_guidance": lambda c: c.ort(split_guidance=True),
    "ort_io_binding": lambda c: c.ort(io_binding=True),
    # --- fast precision modes: the engine on `stepwise export --weights …`
    "stepwise_int8_static": lambda c: _engine(c, export.sibling(c.folder, c.source, "int8-static", c.progress)),
    "stepwise_int8": lambda c: _engine(c, export.sibling(c.folder, c.source, "int8", c.progress)),
    "stepwise_int4": lambda c: _engine(c, export.sibling(c.folder, c.source, "int4", c.progress)),
}


def names() -> list[str]:
    return list(BUILDERS)


def spec(name: str, ctx: Context) -> tuple[str, dict]:
    if name not in BUILDERS:
        raise SystemExit(f"unknown engine '{name}'; known: {', '.join(BUILDERS)}")
    return BUILDERS[name](ctx)
