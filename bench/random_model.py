"""Full-size pipelines with random weights from the real configs (``configs/<family>.json``), no download.

The random pipeline is saved once with ``save_pretrained`` under ``$STEPWISE_HOME/bench/random-<family>-src``
and reused: building SD 1.5's 1.07 B parameters takes a minute, seeded so every run gets the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from registry.home import stepwise_home

CONFIGS = Path(__file__).with_name("configs")
SEED = 0
DONE = "bench-complete.json"  # written last: a folder without it was interrupted and is rebuilt


def families() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.json"))


def config(family: str) -> dict:
    path = CONFIGS / f"{family}.json"
    if not path.is_file():
        raise SystemExit(f"no random build for '{family}'; known: {', '.join(families())}")
    return json.loads(path.read_text())


def cache_root() -> Path:
    return stepwise_home() / "bench"


def _strip(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k != "architectures"}


def _scheduler(registry_model: str):
    import diffusers

    import registry

    cfg = dict(registry.get(registry_model).scheduler)
    return getattr(diffusers, cfg.pop("_class_name")).from_config(cfg)


def build(family: str):
    """The random pipeline of ``family`` in PyTorch (fp32, eval mode, seeded)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from exporters.vocab import clip_tokenizer

    cfg = config(family)
    if cfg["pipeline"] != "StableDiffusionPipeline":
        raise SystemExit(f"random:{family}: building {cfg['pipeline']} is not written yet")
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(**_strip(cfg["unet"])).eval()
    torch.manual_seed(SEED + 1)
    vae = AutoencoderKL(**_strip(cfg["vae"])).eval()
    torch.manual_seed(SEED + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**_strip(cfg["text_encoder"]))).eval()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=_scheduler(cfg["registry_model"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parse(model: str) -> tuple[str, str]:
    """``sd15`` / ``random:sd15`` → ("random", "sd15"); ``tiny:sd15`` → ("tiny", "sd15")."""
    kind, _, family = model.rpartition(":")
    kind = kind or "random"
    if kind not in ("random", "tiny"):
        raise SystemExit(f"--model {model}: use random:<family> (full size) or tiny:<family>")
    return kind, family


def cache_name(model: str) -> str:
    kind, family = parse(model)
    return f"{kind}-{family}"


def source_folder(model: str, progress=print) -> Path:
    """The saved diffusers pipeline of ``random:<family>`` or ``tiny:<family>``, built on first use."""
    kind, family = parse(model)
    folder = cache_root() / f"{cache_name(model)}-src"
    if (folder / DONE).is_file():
        return folder
    if kind == "tiny":
        from exporters import tiny

        progress(f"building tiny:{family} → {folder}")
        pipe = tiny.build(family)
    else:
        progress(f"building random:{family} from the real configs (seed {SEED}) → {folder}")
        pipe = build(family)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / DONE).write_text(json.dumps({"model": f"{kind}:{family}", "seed": SEED}) + "\n")
    return folder
