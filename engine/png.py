"""PNG output with the generation parameters as text chunks.

The ``parameters`` chunk follows the convention AUTOMATIC1111, ComfyUI's readers, Civitai and other tools read:
prompt, then ``Negative prompt: …``, then ``Steps: N, Sampler: …, CFG scale: …, Seed: …, Size: WxH, Model: …``.
Each value is also stored under its own key for programs.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, PngImagePlugin

from registry.files import atomic_write


def parameters_text(p: dict) -> str:
    lines = [p["prompt"]]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    fields = [
        ("Steps", p["steps"]),
        ("Sampler", p.get("sampler") or p["scheduler"]),
        ("CFG scale", p["guidance"]),
        ("Seed", p["seed"]),
        ("Size", f"{p['width']}x{p['height']}"),
        ("Model", p["model"]),
    ]
    if p.get("strength") is not None:  # image-to-image, as AUTOMATIC1111 writes it
        fields.append(("Denoising strength", p["strength"]))
    if p.get("cache"):  # quoted: the label's commas would split it (AUTOMATIC1111 reads quoted values)
        fields.append(("Cache", f'"{p["cache"]}, {p.get("cache_computed_steps", "?")} steps computed"'))
    lines.append(", ".join(f"{k}: {v}" for k, v in fields))
    return "\n".join(lines)


def _text(value: str) -> str:
    """PNG tEXt is Latin-1 without NUL; Pillow stores other text as iTXt, and a NUL would end the chunk."""
    return value.replace("\x00", "")


def png_info(params: dict) -> PngImagePlugin.PngInfo:
    """The PNG text chunks of a generation's parameters: ``parameters`` (the AUTOMATIC1111 convention), one
    chunk per field, and ``Software``."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", _text(parameters_text(params)))
    for key, value in params.items():
        info.add_text(key, _text("" if value is None else str(value)))
    info.add_text("Software", "Stepwise")
    return info


def save_png(result, path, extra: dict | None = None) -> Path:
    info = png_info({**result.parameters, **(extra or {})})
    # a kill or a full disk mid-write leaves the PNG already at that path intact
    image = Image.fromarray(result.image)
    return atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info))


def png_bytes(result, extra: dict | None = None) -> bytes:
    """The PNG ``save_png`` writes, as bytes (what the server sends)."""
    buffer = io.BytesIO()
    Image.fromarray(result.image).save(buffer, format="PNG", pnginfo=png_info({**result.parameters, **(extra or {})}))
    return buffer.getvalue()
