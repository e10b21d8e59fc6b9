"""The DeepFloyd IF cascade → one export folder: the T5 encoder (shared by stages I and II), stage I's UNet and
stage II's UNet, with a manifest that names the stages and carries each one's scheduler configs.

Stage I is an ``IFPipeline`` (hub: DeepFloyd/IF-I-XL-v1.0), stage II an ``IFSuperResolutionPipeline``
(DeepFloyd/IF-II-L-v1.0) whose text encoder is not loaded: diffusers' IF docs load it with ``text_encoder=None``
and feed it stage I's prompt states. Every graph goes through the streamed exporter (exporters/streaming.py:
traced on the meta device, weights written one tensor at a time, tiny builds included), so T5-XXL takes the
``--text-encoder-weights`` formats as SD 3's and FLUX's does and the UNets the ``--weights`` ones.

Layout: ``text_encoder/``, ``tokenizer/``, ``unet/`` (stage I) and ``stage_2/unet/`` (the manifest's ``unet_2``).
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
STAGE_PIPELINES = {1: "IFPipeline", 2: "IFSuperResolutionPipeline"}


def _resolve_stage(spec: str, stage: int):
    src = sources.resolve(spec)
    if src.family != FAMILY or src.pipeline_class != STAGE_PIPELINES[stage]:
        want = STAGE_PIPELINES[stage]
        if src.pipeline_class == STAGE_PIPELINES[2] and stage == 1:
            raise ExportError(
                f"{spec} is DeepFloyd IF's stage II ({src.pipeline_class}); pass stage I (IFPipeline) as SOURCE "
                f"and this one as --stage-2"
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
    """Export stage I (``src``, resolved) and stage II (``stage_2``: a folder or hub repo; a tiny build's own)
    into ``final``. Called by ``exporters.export`` once the destination is checked."""
    from .. import main

    started = time.monotonic()
    if stage_3 is not None:
        raise ExportError(
            "--stage-3 (the x4 upscaler) is not supported yet: Stepwise runs IF's stages I and II; export without it"
        )
    if src.pipeline_class != STAGE_PIPELINES[1]:
        _resolve_stage(src.spec, 1)  # says what to pass instead
    if src.kind == "tiny":
        if stage_2 is not None:
            raise ExportError("tiny:deepfloyd-if builds its own stage II; export it without --stage-2")
        from .tiny import build_cascade

        say(f"building {src.spec} (IFPipeline + IFSuperResolutionPipeline, random weights)")
        stage_1_pipe, stage_2_pipe = build_cascade()
        stage_2_src = src
    else:
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
    if text_encoder_weights != "fp32" and getattr(stage_1_pipe, "text_encoder", None) is None:
        raise ExportError(f"{src.spec} has no T5 encoder; export it with its text_encoder folder")

    scheduler_1 = main.scheduler_config(stage_1_pipe, model)
    config = stage_config(stage_1_pipe, stage_2_pipe, scheduler_1)
    rewrite = main._Rewrite(fuse, weights, "fp32", text_encoder_weights, streamed=True)
    backend = main.backends.make(False, stage_1_pipe)

    final.parent.mkdir(parents=True, exist_ok=True)
    main.reclaim_leftovers(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        main.save_tokenizer(stage_1_pipe.tokenizer, tmp / "tokenizer")
        for folder in (tmp / "text_encoder", tmp / "unet", tmp / "stage_2" / "unet"):
            folder.mkdir(parents=True)
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
        data = {
            "model_id": model.id if model else None,
            "family": FAMILY,
            "source": src.spec,
            "sources": {"stage_1": src.spec, "stage_2": stage_2_src.spec},
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
    say(f"exported {src.spec} + {stage_2_src.spec} to {final} in {time.monotonic() - started:.1f}s")
    return final


def schedulers(config: dict) -> dict[str, dict]:
    """Each stage's scheduler configs by the folder the manifest names for them (``scheduler_config.json`` in it,
    as every export keeps its scheduler); the stage entries keep the folder names."""
    found = {}
    for stage in config["stages"]:
        for key in ("scheduler", "image_noising_scheduler"):
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


def stage_config(stage_1, stage_2, scheduler_1: dict) -> dict:
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
    return {
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
