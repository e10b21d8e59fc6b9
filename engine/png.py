"""PNG output with the generation parameters as text chunks.

The ``parameters`` chunk follows the convention AUTOMATIC1111, ComfyUI's readers, Civitai and other tools read:
prompt, then ``Negative prompt: …``, then ``Steps: N, Sampler: …, CFG scale: …, Seed: …, Size: WxH, Model: …``.
Each value is also stored under its own key for programs.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, PngImagePlugin

# diffusers scheduler class → the sampler name those tools show
SAMPLER_NAMES = {
    "EulerAncestralDiscreteScheduler": "Euler a",
    "EulerDiscreteScheduler": "Euler",
    "FlowMatchEulerDiscreteScheduler": "Euler (flow)",
    "HeunDiscreteScheduler": "Heun",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "UniPCMultistepScheduler": "UniPC",
    "PNDMScheduler": "PLMS",
    "DDIMScheduler": "DDIM",
    "DDPMScheduler": "DDPM",
    "LCMScheduler": "LCM",
}


def parameters_text(p: dict) -> str:
    lines = [p["prompt"]]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    fields = [
        ("Steps", p["steps"]),
        ("Sampler", SAMPLER_NAMES.get(p["scheduler"], p["scheduler"])),
        ("CFG scale", p["guidance"]),
        ("Seed", p["seed"]),
        ("Size", f"{p['width']}x{p['height']}"),
        ("Model", p["model"]),
    ]
    lines.append(", ".join(f"{k}: {v}" for k, v in fields))
    return "\n".join(lines)


def save_png(result, path, extra: dict | None = None) -> Path:
    params = {**result.parameters, **(extra or {})}
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters_text(params))
    for key, value in params.items():
        info.add_text(key, "" if value is None else str(value))
    info.add_text("Software", "Stepwise")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(result.image).save(path, pnginfo=info)
    return path
