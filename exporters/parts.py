"""Parts applied to a pipeline before export: replacement UNet weights (``--unet``) and LoRAs (``--lora``).

A part is ``FILE`` (a local path) or ``REPO:FILE`` (a file of a hub repo, fetched with
``hf_hub_download`` through the same cache/offline/token rules as the source).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import ExportError


def fetch(spec: str, what: str) -> Path:
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    repo, sep, filename = spec.partition(":")
    if sep and repo and filename and "/" in repo and not path.exists():
        from .sources import hub_file

        return hub_file(repo, filename, f"the {what} file {filename}")
    raise ExportError(f"{what} file {spec} not found; pass an existing .safetensors file or REPO:FILE from the hub")


def denoiser(pipeline):
    for name in ("unet", "transformer"):
        module = getattr(pipeline, name, None)
        if module is not None:
            return name, module
    raise ExportError("this pipeline has neither a UNet nor a transformer to replace")


def apply_unet(pipeline, path: Path) -> None:
    """Replace the denoiser's weights with a full state dict (SDXL-Lightning's ``*_unet.safetensors``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    name, module = denoiser(pipeline)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ExportError(f"{path} is not a readable safetensors file ({exc}); pass a {name} state dict") from None
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        lines = str(exc).strip().splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        raise ExportError(
            f"the weights in {path} do not fit this pipeline's {name} ({detail}); "
            f"pass a {name} state dict for the same architecture"
        ) from None
    if missing or unexpected:
        example = (list(missing) + list(unexpected))[0]
        raise ExportError(
            f"the weights in {path} do not fit this pipeline's {name}: {len(missing)} missing and "
            f"{len(unexpected)} unexpected keys (e.g. {example}); pass a full diffusers-format {name} state dict"
        )
    module.eval()


def apply_lora(pipeline, path: Path, scale: float) -> None:
    """Fuse a LoRA into the weights: ``load_lora_weights`` + ``fuse_lora(lora_scale)`` + unload."""
    if importlib.util.find_spec("peft") is None:
        raise ExportError("--lora needs the peft package; install it with pip install 'stepwise[export]'")
    if not hasattr(pipeline, "load_lora_weights"):
        raise ExportError(f"{type(pipeline).__name__} does not take LoRAs in diffusers; export without --lora")
    try:
        pipeline.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="stepwise")
        pipeline.fuse_lora(lora_scale=scale, adapter_names=["stepwise"])
        pipeline.unload_lora_weights()
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"cannot apply the LoRA {path} to this {type(pipeline).__name__} ({first}); "
            f"pass a diffusers/kohya LoRA made for this model family"
        ) from None
    for module in pipeline.components.values():
        if hasattr(module, "eval"):
            module.eval()
