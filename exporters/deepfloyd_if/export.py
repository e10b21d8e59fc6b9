"""The DeepFloyd IF cascade → one export folder: the T5 encoder (shared by stages I and II), stage I's UNet,
stage II's UNet and, with ``--stage-3``, the x4 upscaler's CLIP text encoder, UNet and VAE decoder, with a
manifest that names the stages and carries each one's scheduler configs.

Stage I is an ``IFPipeline`` (hub: DeepFloyd/IF-I-XL-v1.0), stage II an ``IFSuperResolutionPipeline``
(DeepFloyd/IF-II-L-v1.0) whose text encoder is not loaded: diffusers' IF docs load it with ``text_encoder=None``
and feed it stage I's prompt states. Every graph goes through the streamed exporter (exporters/streaming.py:
traced on the meta device, weights written one tensor at a time, tiny builds included), so T5-XXL takes the
``--text-encoder-weights`` formats as SD 3's and FLUX's does and the UNets the ``--weights`` ones.

Stage III is diffusers' ``StableDiffusionUpscalePipeline`` (stabilityai/stable-diffusion-x4-upscaler), as
diffusers' IF docs chain it after stage II (``noise_level=100``). Its components are its own and go through the
exporters every SD pipeline uses (``main._export_components``): a folder or hub checkpoint streamed (its UNet and
CLIP on the meta device), a tiny one exported from memory; the VAE encoder is not exported (nothing encodes).

Layout: ``text_encoder/``, ``tokenizer/``, ``unet/`` (stage I), ``stage_2/unet/`` (the manifest's ``unet_2``) and
``stage_3/{text_encoder,tokenizer,unet,vae_decoder}/`` (``text_encoder_3``, ``unet_3``, ``vae_decoder_3``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from .. import sources
from ..errors import ExportError

FAMILY = "deepfloyd-if"
# IFPipeline.encode_prompt's fixed T5 window
MAX_SEQUENCE_LENGTH = 77
# IFSuperResolutionPipeline.__call__'s defaults
STAGE_2_NOISE_LEVEL = 250
STAGE_2_GUIDANCE = 4.0
STAGE_2_STEPS = 50
STAGE_1_GUIDANCE = 7.0
# stage III: StableDiffusionUpscalePipeline.__call__'s defaults (75 steps, guidance 9.0) and the noise level
# diffusers' IF docs call it with (its own default is 20)
STAGE_3_NOISE_LEVEL = 100
STAGE_3_GUIDANCE = 9.0
STAGE_3_STEPS = 75
STAGE_3_COMPONENTS = ("text_encoder", "unet", "vae_decoder")
STAGE_PIPELINES = {1: "IFPipeline", 2: "IFSuperResolutionPipeline", 3: "StableDiffusionUpscalePipeline"}
# `--stage-3` given without a value: the registry entry's stage III checkpoint
REGISTRY_STAGE = ""


def _resolve_stage(spec: str, stage: int):
    src = sources.resolve(spec)
    if src.family != FAMILY or src.pipeline_class != STAGE_PIPELINES[stage]:
        want = STAGE_PIPELINES[stage]
        later = {cls: n for n, cls in STAGE_PIPELINES.items() if n > 1}
        if src.pipeline_class in later and stage == 1:
            n = later[src.pipeline_class]
            raise ExportError(
                f"{spec} is DeepFloyd IF's stage {'I' * n} ({src.pipeline_class}); pass stage I (IFPipeline) as "
                f"SOURCE and this one as --stage-{n}"
            )
        raise ExportError(f"--stage-{stage} {spec} is {src.pipeline_class}; stage {stage} of DeepFloyd IF is {want}")
    return src


def _load(src, *, without_text_encoder: bool):
    """The stage's pipeline, its UNet and T5 built on the meta device (their weights stay on disk)."""
    from ..backends import quiet

    sources.fetch(src)
    with quiet():
        return sources.load_folder(
            src.folder, src.spec, streamed=True, exclude=("text_encoder",) if without_text_encoder else ()
        )


def export_cascade(
    src,
    *,
    stage_2: str | None,
    stage_3: str | None,
    final: Path,
    model,
    weights: str,
    text_encoder_weights: str,
    opset: int,
    fuse: bool,
    say,
) -> Path:
    """Export stage I (``src``, resolved), stage II (``stage_2``: a folder or hub repo) and, when ``stage_3`` is
    given, stage III (a folder or hub repo; ``REGISTRY_STAGE``: the registry model's) into ``final``; a tiny
    build has its own stages II and III (``REGISTRY_STAGE`` adds its stage III). Called by ``exporters.export``
    once the destination is checked."""
    from .. import main

    started = time.monotonic()
    if src.pipeline_class != STAGE_PIPELINES[1]:
        _resolve_stage(src.spec, 1)  # says what to pass instead
    stage_3_src = stage_3_pipe = None
    if src.kind == "tiny":
        # shaped as the registry model's export: stages I and II, and its own stage III with --stage-3 alone
        if stage_2 is not None or stage_3 not in (None, REGISTRY_STAGE):
            raise ExportError(
                f"{src.spec} builds its own stages: export it without --stage-2, and with --stage-3 alone (no folder) "
                f"for its stage III"
            )
        from .tiny import build_cascade, build_stage_3

        upscaler = " + StableDiffusionUpscalePipeline" if stage_3 is not None else ""
        say(f"building {src.spec} (IFPipeline + IFSuperResolutionPipeline{upscaler}, random)")
        stage_1_pipe, stage_2_pipe = build_cascade()
        stage_2_src = src
        if stage_3 is not None:
            stage_3_src, stage_3_pipe = src, build_stage_3()
    else:
        if stage_3 == REGISTRY_STAGE:
            stage_3 = _registry_stage_3(model)
        if stage_3 is not None:  # resolved before anything is loaded: a wrong stage III fails in a second
            stage_3_src = _resolve_stage(stage_3, 3)
        if stage_2 is None:
            stage_2 = model.stages[0]["hub_id"] if model is not None and model.stages else None
        if stage_2 is None:
            raise ExportError(
                f"DeepFloyd IF is a cascade: pass its stage II with --stage-2 FOLDER_OR_REPO "
                f"(e.g. --stage-2 DeepFloyd/IF-II-L-v1.0), or export with --model {FAMILY}"
            )
        stage_2_src = _resolve_stage(stage_2, 2)
        say(f"loading {src.spec} (stage I) and {stage_2_src.spec} (stage II) without their weights")
        stage_1_pipe = _load(src, without_text_encoder=False)
        stage_2_pipe = _load(stage_2_src, without_text_encoder=True)
        if stage_3_src is not None:
            say(f"loading {stage_3_src.spec} (stage III) without its UNet's and text encoder's weights")
            stage_3_pipe = _load(stage_3_src, without_text_encoder=False)
    if text_encoder_weights != "fp32" and getattr(stage_1_pipe, "text_encoder", None) is None:
        raise ExportError(f"{src.spec} has no T5 encoder; export it with its text_encoder folder")

    scheduler_1 = main.scheduler_config(stage_1_pipe, model)
    config = stage_config(stage_1_pipe, stage_2_pipe, scheduler_1, stage_3_pipe)
    rewrite = main._Rewrite(fuse, weights, "fp32", text_encoder_weights, streamed=True)
    backend = main.backends.make(False, stage_1_pipe)
    # stage III's CLIP is no big text encoder (fp32 whatever --text-encoder-weights says); a tiny one is exported
    # from memory through TorchScript, as the tiny SD pipelines are
    tiny_3 = stage_3_src is not None and stage_3_src.kind == "tiny"
    rewrite_3 = main._Rewrite(fuse, weights, "fp32", "fp32", streamed=not tiny_3)

    final.parent.mkdir(parents=True, exist_ok=True)
    main.reclaim_leftovers(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        main.save_tokenizer(stage_1_pipe.tokenizer, tmp / "tokenizer")
        for folder in (tmp / "text_encoder", tmp / "unet", tmp / "stage_2" / "unet"):
            folder.mkdir(parents=True)
        if stage_3_pipe is not None:  # configs first: exporting a component releases its module
            _write_stage_3_configs(stage_3_pipe, tmp / "stage_3")
        for folder, scheduler in schedulers(config).items():
            (tmp / folder).mkdir(parents=True)
            text = json.dumps(scheduler, indent=2, sort_keys=True) + "\n"
            (tmp / folder / "scheduler_config.json").write_text(text)
        stage_1_pipe.text_encoder.config.save_pretrained(str(tmp / "text_encoder"))
        stage_1_pipe.unet.save_config(str(tmp / "unet"))
        stage_2_pipe.unet.save_config(str(tmp / "stage_2" / "unet"))
        entries = main._export_components(stage_1_pipe, backend, tmp, opset, say, rewrite, src)
        say("stage II:")
        second = main._export_components(stage_2_pipe, backend, tmp / "stage_2", opset, say, rewrite, stage_2_src)
        entries["unet_2"] = _moved(second["unet"], "stage_2")
        sources_ = {"stage_1": src.spec, "stage_2": stage_2_src.spec}
        if stage_3_pipe is not None:
            say("stage III:")
            backend_3 = main.backends.make(False, stage_3_pipe)
            third = main._export_components(
                stage_3_pipe, backend_3, tmp / "stage_3", opset, say, rewrite_3, stage_3_src, only=STAGE_3_COMPONENTS
            )
            for name in STAGE_3_COMPONENTS:
                entries[f"{name}_3"] = _moved(third[name], "stage_3")
            sources_["stage_3"] = stage_3_src.spec
        data = {
            "model_id": model.id if model else None,
            "family": FAMILY,
            "source": src.spec,
            "sources": sources_,
            "random_weights": src.random_weights,
            "scheduler_source": f"registry:{model.id}" if model else "checkpoint",
            "opset": opset,
            "precision": weights,
            "vae_precision": "fp32",
            "text_encoder_precision": text_encoder_weights,
            "exporter": backend.name,
            "components": entries,
            "config": config,
        }
        main.commit(tmp, final, data, started)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stages = " + ".join(dict.fromkeys(sources_.values()))
    say(f"exported {stages} to {final} in {time.monotonic() - started:.1f}s")
    return final


def _registry_stage_3(model) -> str:
    """``--stage-3`` without a value: the registry entry's stage III checkpoint."""
    for stage in model.stages if model is not None else ():
        if int(stage["stage"]) == 3:
            return stage["hub_id"]
    raise ExportError(
        f"--stage-3 without a folder takes the registry's x4 upscaler: export with --model {FAMILY}, or pass "
        f"--stage-3 FOLDER_OR_REPO (e.g. stabilityai/stable-diffusion-x4-upscaler)"
    )


def _write_stage_3_configs(pipe, folder: Path) -> None:
    """Stage III's tokenizer and its components' diffusers/transformers configs, beside their graphs."""
    from .. import main

    main.save_tokenizer(pipe.tokenizer, folder / "tokenizer")
    for name, module in (("text_encoder", pipe.text_encoder), ("unet", pipe.unet), ("vae_decoder", pipe.vae)):
        main.save_component_config(module, folder / name)


def schedulers(config: dict) -> dict[str, dict]:
    """Each stage's scheduler configs by the folder the manifest names for them (``scheduler_config.json`` in it,
    as every export keeps its scheduler); the stage entries keep the folder names."""
    found = {}
    for stage in config["stages"]:
        for key in ("scheduler", "image_noising_scheduler", "low_res_scheduler"):
            if isinstance(stage.get(key), dict):
                folder = key if stage["stage"] == 1 else f"stage_{stage['stage']}/{key}"
                found[folder] = stage[key]
                stage[key] = folder
    return found


def _moved(entry: dict, folder: str) -> dict:
    """A component's manifest entry with its files under ``folder``."""
    moved = dict(entry)
    for key in ("path", "data_path"):
        if moved.get(key):
            moved[key] = f"{folder}/{moved[key]}"
    return moved


def _scheduler(pipeline_scheduler) -> dict:
    return json.loads(pipeline_scheduler.to_json_string())


def stage_3_config(stage_3) -> dict:
    """Stage III's entry: StableDiffusionUpscalePipeline's constants. Its latents are the input image's size (the
    VAE's x4 makes the output); the low-res scheduler noises the input image to ``noise_level``."""
    unet, vae = stage_3.unet.config, stage_3.vae.config
    return {
        "stage": 3,
        "pipeline_class": STAGE_PIPELINES[3],
        "unet": "unet_3",
        "text_encoder": "text_encoder_3",
        "tokenizer": "stage_3/tokenizer",
        "vae_decoder": "vae_decoder_3",
        "in_channels": int(unet.in_channels),
        "latent_channels": int(vae.latent_channels),
        "guidance": STAGE_3_GUIDANCE,
        "noise_level": STAGE_3_NOISE_LEVEL,
        "max_noise_level": int(stage_3.config.max_noise_level),
        "default_steps": STAGE_3_STEPS,
        "vae_scale_factor": int(stage_3.vae_scale_factor),
        "vae_scaling_factor": float(vae.scaling_factor),
        "vae_sample_size": int(vae.sample_size[0] if isinstance(vae.sample_size, (list, tuple)) else vae.sample_size),
        "vae_block_out_channels": [int(c) for c in vae.block_out_channels],
        "vae_mid_block_attention": bool(getattr(vae, "mid_block_add_attention", True)),
        "scheduler": _scheduler(stage_3.scheduler),
        "low_res_scheduler": _scheduler(stage_3.low_res_scheduler),
    }


def stage_config(stage_1, stage_2, scheduler_1: dict, stage_3=None) -> dict:
    """What the engine needs without torch: each stage's UNet, size, scheduler(s) and pipeline defaults."""
    from .. import main

    unet_1, unet_2 = stage_1.unet.config, stage_2.unet.config
    t5 = stage_1.text_encoder.config
    size_1 = int(unet_1.sample_size)
    stages = [
        {
            "stage": 1,
            "pipeline_class": STAGE_PIPELINES[1],
            "unet": "unet",
            "sample_size": size_1,
            "in_channels": int(unet_1.in_channels),
            "out_channels": int(unet_1.out_channels),
            "guidance": STAGE_1_GUIDANCE,
            "scheduler": scheduler_1,
        },
        {
            "stage": 2,
            "pipeline_class": STAGE_PIPELINES[2],
            "unet": "unet_2",
            "sample_size": int(unet_2.sample_size),
            "in_channels": int(unet_2.in_channels),
            "out_channels": int(unet_2.out_channels),
            "guidance": STAGE_2_GUIDANCE,
            "noise_level": STAGE_2_NOISE_LEVEL,
            "default_steps": STAGE_2_STEPS,
            "scheduler": _scheduler(stage_2.scheduler),
            "image_noising_scheduler": _scheduler(stage_2.image_noising_scheduler),
        },
    ]
    config = {
        "pipeline_class": STAGE_PIPELINES[1],
        "denoiser": "unet",
        # pixel space: the UNet's sample is the image (no VAE)
        "vae_scale_factor": 1,
        "latent_channels": int(unet_1.in_channels),
        "in_channels": int(unet_1.in_channels),
        "sample_size": size_1,
        "default_image_size": size_1,
        "text_encoder_layers": {"text_encoder": int(t5.num_layers)},
        "text_encoder_hidden_size": {"text_encoder": int(t5.d_model)},
        "tokenizer_max_length": {"tokenizer": MAX_SEQUENCE_LENGTH},
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "text_attention_mask": True,  # IF's pipelines pass the tokenizer's mask to T5
        "lowercase_prompt": True,  # IFPipeline._text_preprocessing without clean_caption: lower().strip()
        "timestep_shape": "scalar",
        "timestep_scale": 1.0,
        "scheduler_class": scheduler_1.get("_class_name"),
        "prediction_type": scheduler_1.get("prediction_type"),
        "denoiser_attention": main._attention_layout("unet", stage_1.unet, FAMILY, 0, {}),
        "denoiser_attention_2": main._attention_layout("unet", stage_2.unet, FAMILY, 0, {}),
        "stages": stages,
    }
    if stage_3 is not None:
        stages.append(stage_3_config(stage_3))
        clip = stage_3.text_encoder.config
        config["text_encoder_layers"]["text_encoder_3"] = int(clip.num_hidden_layers)
        config["text_encoder_hidden_size"]["text_encoder_3"] = int(clip.hidden_size)
        config["tokenizer_max_length"]["stage_3/tokenizer"] = int(stage_3.tokenizer.model_max_length)
        config["denoiser_attention_3"] = main._attention_layout("unet", stage_3.unet, FAMILY, 0, {})
    return config
