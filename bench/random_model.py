"""Full-size pipelines with random weights from the real configs (``configs/<family>.json``), no download.

The random pipeline is saved once under ``$STEPWISE_HOME/bench/random-<family>-src`` and reused, seeded so
every run gets the same weights: the UNet families (SD 1.5, SDXL) built in PyTorch and saved with
``save_pretrained`` (building SD 1.5's 1.07 B parameters takes a minute), the transformer families (SD3,
FLUX) written straight to bf16 safetensors shards by ``random_weights`` (FLUX.1 is 48 GB in fp32).
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


def split_units(family: str) -> tuple[str, int | None]:
    """``sdxl@u2`` (the reduced-depth build at 2 units) → ("sdxl", 2); ``sdxl`` → ("sdxl", None)."""
    base, _, units = family.partition("@u")
    return base, (int(units) if units else None)


def config(family: str) -> dict:
    """The family's config; for ``<family>@u<N>`` with the repeated blocks cut to N units (``reduced``)."""
    base, units = split_units(family)
    path = CONFIGS / f"{base}.json"
    if not path.is_file():
        raise SystemExit(f"no random build for '{base}'; known: {', '.join(families())}")
    cfg = json.loads(path.read_text())
    if units is not None:
        cfg = reduce_depth(cfg, units)
    return cfg


def reduced(family: str) -> dict | None:
    """The family's reduced-depth plan (``units``, ``denoiser``/``text`` real depths), None if built in full."""
    return config(split_units(family)[0]).get("reduced")


def reduce_depth(cfg: dict, units: int) -> dict:
    """A copy of ``cfg`` whose repeated blocks are cut to ``units`` units: every ``[component, key, index,
    per_unit]`` of ``reduced.denoiser.set`` and ``reduced.text.set`` becomes ``units × per_unit``."""
    plan = cfg.get("reduced")
    if not plan:
        raise SystemExit(f"{cfg.get('registry_model')}: built in full, no reduced depth")
    cfg = json.loads(json.dumps(cfg))
    for part in ("denoiser", "text"):
        for component, key, index, per_unit in plan.get(part, {}).get("set", []):
            if index is None:
                cfg[component][key] = units * per_unit
            else:
                cfg[component][key][index] = units * per_unit
    cfg["depth_units"] = units
    _cut_llama_layers(cfg, json.loads(json.dumps(plan)))
    return cfg


def _cut_llama_layers(cfg: dict, plan: dict) -> None:
    """HiDream: ``llama_layers`` names one Llama layer per transformer block (double-stream blocks first): keep the
    entries of the kept blocks, each inside the reduced Llama's layers."""
    transformer, llama = cfg.get("transformer", {}), cfg.get("text_encoder_4")
    if "llama_layers" not in transformer or llama is None:
        return
    layers = transformer["llama_layers"]
    real_double = len(layers) - int(config_file(cfg)["transformer"]["num_single_layers"])
    last = int(llama["num_hidden_layers"]) - 1
    kept = layers[: transformer["num_layers"]] + layers[real_double : real_double + transformer["num_single_layers"]]
    transformer["llama_layers"] = [min(int(k), last) for k in kept]


def config_file(cfg: dict) -> dict:
    """The unreduced config ``cfg`` was made from."""
    return json.loads((CONFIGS / f"{cfg['registry_model']}.json").read_text())


def cache_root() -> Path:
    return stepwise_home() / "bench"


def _strip(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k != "architectures"}


def _scheduler(registry_model: str):
    import diffusers

    import registry

    cfg = dict(registry.get(registry_model).scheduler)
    return getattr(diffusers, cfg.pop("_class_name")).from_config(cfg)


def text_encoder_class(cfg: dict):
    """The transformers model class and its config object for a text encoder's ``config.json`` (T5: the
    encoder alone, ``is_encoder_decoder=False, use_cache=False``; Qwen2.5-VL: the whole
    ``Qwen2_5_VLForConditionalGeneration``, vision tower and ``lm_head`` included, as the hub stores it)."""
    import transformers

    arch = cfg.get("architectures", ["CLIPTextModel"])[0]
    config_cls = {
        "T5EncoderModel": transformers.T5Config,
        "LlamaForCausalLM": transformers.LlamaConfig,
        "Qwen2_5_VLForConditionalGeneration": transformers.Qwen2_5_VLConfig,  # flat text keys → text_config
    }.get(arch, transformers.CLIPTextConfig)
    extra = {"is_encoder_decoder": False, "use_cache": False} if arch == "T5EncoderModel" else {}
    return getattr(transformers, arch), config_cls(**{**_strip(cfg), **extra})


def _text_encoder(cfg: dict, seed: int):
    import torch

    torch.manual_seed(seed)
    cls, text_config = text_encoder_class(cfg)
    return cls(text_config).eval()


def _module(cls_name: str, cfg: dict, seed: int):
    import diffusers
    import torch

    torch.manual_seed(seed)
    return getattr(diffusers, cls_name)(**_strip(cfg)).eval()


def build(family: str):
    """The random pipeline of ``family`` (or ``<family>@u<N>``, reduced depth) in PyTorch (fp32, eval, seeded)."""
    import diffusers

    from exporters.vocab import clip_tokenizer, t5_tokenizer

    cfg = config(family)
    kind = cfg["pipeline"]
    parts = {"scheduler": _scheduler(cfg["registry_model"])}
    parts["vae"] = _module("AutoencoderKL", cfg["vae"], SEED + 1)
    parts["text_encoder"] = _text_encoder(cfg["text_encoder"], SEED + 2)
    parts["tokenizer"] = clip_tokenizer()
    if kind == "StableDiffusionPipeline":
        parts["unet"] = _module("UNet2DConditionModel", cfg["unet"], SEED)
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif kind == "StableDiffusionXLPipeline":
        parts["unet"] = _module("UNet2DConditionModel", cfg["unet"], SEED)
        parts["text_encoder_2"] = _text_encoder(cfg["text_encoder_2"], SEED + 4)
        parts["tokenizer_2"] = clip_tokenizer(pad_token="!")  # CLIP-G pads with "!", as the real checkpoint
    elif kind == "StableDiffusion3Pipeline":
        parts["transformer"] = _module("SD3Transformer2DModel", cfg["transformer"], SEED + 3)
        parts["text_encoder_2"] = _text_encoder(cfg["text_encoder_2"], SEED + 4)
        parts["tokenizer_2"] = clip_tokenizer(pad_token="!")
        parts["text_encoder_3"] = _text_encoder(cfg["text_encoder_3"], SEED + 5)
        parts["tokenizer_3"] = t5_tokenizer()
    elif kind == "FluxPipeline":
        parts["transformer"] = _module("FluxTransformer2DModel", cfg["transformer"], SEED + 3)
        parts["text_encoder_2"] = _text_encoder(cfg["text_encoder_2"], SEED + 5)
        parts["tokenizer_2"] = t5_tokenizer()
    else:
        raise SystemExit(f"random:{family}: building {kind} is not written yet")
    pipe = getattr(diffusers, kind)(**parts)
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
    return f"{kind}-{family.replace('@', '-')}"


def source_folder(model: str, progress=print) -> Path:
    """The saved diffusers pipeline of ``random:<family>`` or ``tiny:<family>``, built on first use. The full-size
    families ``random_weights`` knows (SD 1.5, SDXL, SD 3, FLUX) are written tensor by tensor as bf16 shards, as
    the hub ships them, never held in memory; the others are built in PyTorch and saved."""
    kind, family = parse(model)
    folder = cache_root() / f"{cache_name(model)}-src"
    if (folder / DONE).is_file():
        return folder
    if kind == "random":
        from . import random_weights

        if config(family)["pipeline"] in random_weights.PIPELINES:
            return random_weights.write_pipeline(family, folder, seed=SEED, progress=progress)
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
