"""The two ways a Component becomes an ONNX file: optimum's exporter, or plain ``torch.onnx``.

Both trace with TorchScript (``torch.onnx.export(dynamo=False)``, which is what optimum uses too; the
dynamo exporter would need onnxscript), produce the same graph input/output names and dtypes (int64
ids, float32 everything else, a float32 scalar UNet timestep) and store weights over 2 GB as one
external-data file, ``model.onnx_data``, beside ``model.onnx``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

from .components import Component

DATA_SUFFIX = "_data"  # model.onnx -> model.onnx_data, as optimum names it


def optimum_available() -> bool:
    try:
        import optimum.exporters.onnx  # noqa: F401
        from optimum.exporters.utils import get_diffusion_models_for_export  # noqa: F401
    except Exception:  # ImportError, or an optimum too old/new for this diffusers
        return False
    return True


@contextlib.contextmanager
def quiet():
    """Silence the tracer's and the libraries' warnings during an export (they are not actionable)."""
    loggers = [logging.getLogger(n) for n in ("optimum", "transformers", "diffusers", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def consolidate_external_data(path: Path, *, force: bool = False) -> Path | None:
    """Gather a graph's external tensors into one ``model.onnx_data``; returns it, or None if inline.

    TorchScript writes a model over 2 GB as one file per tensor beside the graph. ``force`` moves the
    weights out of a small graph too (the tests use it to check the engine reads the layout).
    """
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    external = [t for t in model.graph.initializer if uses_external_data(t)]
    target = path.with_name(path.name + DATA_SUFFIX)
    if not external and not force:
        return None
    old_files = {entry.value for t in external for entry in t.external_data if entry.key == "location"} - {target.name}
    del model
    model = onnx.load(str(path), load_external_data=True)
    if target.exists():
        target.unlink()
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=target.name,
        size_threshold=1024,
        convert_attribute=False,
    )
    for name in old_files:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path.parent / name)
    return target


class TorchOnnx:
    """``torch.onnx.export`` on the Component's wrapper: no optimum needed."""

    name = "torch.onnx"

    def __init__(self, pipeline=None):
        del pipeline

    def export(self, component: Component, path: Path, opset: int) -> None:
        import torch

        feeds = component.example("export")
        args = tuple(torch.from_numpy(feeds[name]) for name in component.inputs)
        axes = {k: v for k, v in {**component.inputs, **component.outputs}.items() if v}
        path.parent.mkdir(parents=True, exist_ok=True)
        with quiet(), torch.no_grad(), _onnx_friendly_ops(), _flux_rotary_patch(component):
            torch.onnx.export(
                component.wrapper,
                args,
                str(path),
                input_names=list(component.inputs),
                output_names=list(component.outputs),
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        consolidate_external_data(path)

    def release(self, name: str) -> None:
        pass


class Optimum:
    """optimum's diffusers exporter, one component at a time (``get_diffusion_models_for_export`` +
    ``optimum.exporters.onnx.convert.export``), so we control progress, validation and the layout."""

    name = "optimum"

    def __init__(self, pipeline):
        import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
        from optimum.exporters.utils import get_diffusion_models_for_export

        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(pipeline, name, None)
            if module is not None and type(module).__name__.startswith("CLIPTextModel"):
                # every CLIP encoder gets hidden_states.0..N (optimum does it for SDXL/SD3 only)
                module.config.output_hidden_states = True
        with quiet():
            self.models = get_diffusion_models_for_export(pipeline, int_dtype="int64", float_dtype="fp32")

    def export(self, component: Component, path: Path, opset: int) -> None:
        from optimum.exporters.onnx.convert import export

        model, onnx_config = self.models[component.name]
        path.parent.mkdir(parents=True, exist_ok=True)
        with quiet():
            export(model=model, config=onnx_config, output=path, opset=opset, device="cpu")
        consolidate_external_data(path)

    def release(self, name: str) -> None:
        self.models.pop(name, None)


def make(use_optimum: bool | None, pipeline):
    if use_optimum is None:
        use_optimum = optimum_available()
    return Optimum(pipeline) if use_optimum else TorchOnnx(pipeline)


@contextlib.contextmanager
def _onnx_friendly_ops():
    """``aten::rms_norm`` (torch.nn.RMSNorm: FLUX's and SD3.5's q/k norms) has no opset-17 export."""
    import torch
    import torch.nn.functional as F

    originals = (torch.rms_norm, F.rms_norm)
    torch.rms_norm = F.rms_norm = _rms_norm
    try:
        yield
    finally:
        torch.rms_norm, F.rms_norm = originals


def _rms_norm(input, normalized_shape, weight=None, eps=None):
    import torch

    if eps is None:
        eps = torch.finfo(input.dtype).eps
    dims = tuple(range(-len(normalized_shape), 0))
    out = input * torch.rsqrt(torch.mean(input * input, dim=dims, keepdim=True) + eps)
    return out * weight if weight is not None else out


@contextlib.contextmanager
def _flux_rotary_patch(component: Component):
    """FLUX's rotary embedding reshapes with sizes that TorchScript bakes in; use slicing instead
    (the same rewrite optimum's FluxTransformerModelPatcher does)."""
    if component.kind != "flux-transformer":
        yield
        return
    import diffusers.models.transformers.transformer_flux as flux

    original = getattr(flux, "apply_rotary_emb", None)
    if original is None:
        yield
        return
    flux.apply_rotary_emb = _apply_rotary_emb
    try:
        yield
    finally:
        flux.apply_rotary_emb = original


def _apply_rotary_emb(x, freqs_cis, use_real=True, use_real_unbind_dim=-1, sequence_dim=2):
    import torch

    cos, sin = freqs_cis
    if sequence_dim == 2:
        cos, sin = cos[None, None, :, :], sin[None, None, :, :]
    else:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    if use_real_unbind_dim == -1:
        x_real, x_imag = x[..., 0::2], x[..., 1::2]
        x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    else:
        x_real, x_imag = x[..., 0::2, :], x[..., 1::2, :]
        x_rotated = torch.cat([-x_imag, x_real], dim=-1)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)
