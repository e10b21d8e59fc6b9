"""``export()``: a diffusers checkpoint → a validated ONNX folder with a ``stepwise.json`` manifest.

The folder is built in a hidden temporary sibling (``.<name>.tmp-XXXX``), the manifest is written last,
and only then is the folder renamed into place (replacing an earlier export only after success). Any
failure, interrupt included, removes the temporary folder: a folder at the final path with a
``stepwise.json`` is always complete and validated.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import re
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import registry
from registry import manifest as manifest_io
from registry.files import process_alive, replace_folder
from registry.machine import available_memory_mb
from registry.pipelines import T5_SEQUENCE_LENGTH

from . import (
    backends,
    calibrate,
    components,
    deepfloyd_if,
    optimize,
    parts,
    quantize,
    qwen_image,
    reduced,
    shared_weights,
    sources,
    split,
    streaming,
    validate,
)
from . import weights as weight_formats
from .errors import ExportError
from .families import DENOISERS, TEXT_ENCODERS, TOKENIZERS
from .hidream import text as hidream_text

DENOISER_GRAPHS = (*DENOISERS, *split.GRAPHS)  # the whole denoiser and its step-cache parts share its precision

MIN_OPSET, MAX_OPSET = 14, 20  # SDPA needs 14; 20 is the TorchScript exporter's newest
BIG_COMPONENT = 50_000_000  # parameters; below this a gc pass costs more time than the memory is worth
VERSIONED = ("torch", "diffusers", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "peft")
# A graph quantized after export from a module in memory (a UNet's static int8 and the VAE decoder's, along
# their recorded sampling trajectories; a UNet's int4, on the validation inputs) is checked against PyTorch by
# the signal-to-noise ratio of its output, not by an fp32 tolerance. Below this floor it is broken (wrong
# scales, saturation), not merely less precise: the tiny random-weight UNets give 16-24 dB in int8-static (LCM
# lowest) and ~40 dB in int4. (Streamed formats: exporters/weights.py.)
MIN_SNR_DB = {"int8": 12.0, "int8-static": 12.0, "int4": 12.0}
# The calibrated --weights int8-static of a UNet checkpoint holds the pipeline while it samples, then onnxruntime's
# quantize_static holds the UNet graph several times over: 17.2 GB measured for SD 1.5's 3.4 GB fp32 UNet.
CALIBRATED_INT8_PEAK_PER_UNET_BYTE = 5.0
# --vae-weights int8 holds the whole pipeline in fp32 while it samples (its final latents calibrate the decoder):
# a pipeline-loading export of SD 1.5 peaked at 8.22 GB, ~1.9x its 4.3 GB of fp32 weights; with the sampling
# and the decoder's quantize_static on top, this factor leaves room.
CALIBRATED_VAE_PEAK_PER_PIPELINE_BYTE = 2.5


def export(
    source: str,
    *,
    out: Path | str | None = None,
    model_id: str | None = None,
    unet: str | None = None,
    lora: str | None = None,
    lora_scale: float = 1.0,
    opset: int = 17,
    use_optimum: bool | None = None,
    weights: str | None = None,
    vae_weights: str = "fp32",
    text_encoder_weights: str | None = None,
    fuse: bool = True,
    stage_2: str | None = None,
    stage_3: str | None = None,
    cache_graphs: bool = False,
    progress=print,
) -> Path:
    """Export SOURCE (hub repo id, diffusers pipeline folder or ``tiny:<family>``) to ONNX.

    ``stage_2``/``stage_3``: a cascade's later stages (DeepFloyd IF: SOURCE is stage I), folders or hub repos.

    Returns the final folder. Raises ExportError (one line: the problem and the fix) for anything the
    caller can fix: a bad source, a registry mismatch, a missing package, a graph that fails validation.
    ``cache_graphs``: write the transformer a second time as the graphs step caching runs (exporters/split.py).
    """
    say = progress or (lambda _message: None)
    started = time.monotonic()
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset {opset} is not supported; use an opset from {MIN_OPSET} to {MAX_OPSET} (default 17)")
    if weights is not None and weights not in quantize.WEIGHTS:
        raise ExportError(f"--weights {weights} is not a precision mode; use one of {', '.join(quantize.WEIGHTS)}")
    if vae_weights not in quantize.VAE_WEIGHTS:
        raise ExportError(
            f"--vae-weights {vae_weights} is not a precision mode; use one of {', '.join(quantize.VAE_WEIGHTS)}"
        )
    if text_encoder_weights is not None and text_encoder_weights not in weight_formats.FORMATS:
        raise ExportError(
            f"--text-encoder-weights {text_encoder_weights} is not a precision mode; "
            f"use one of {', '.join(weight_formats.FORMATS)}"
        )
    if use_optimum and not backends.optimum_available():
        raise ExportError(
            "optimum's ONNX exporter is not importable; install it with pip install 'stepwise[export]' "
            "or export with the plain torch.onnx exporter (use_optimum=False)"
        )

    src = sources.resolve(source)
    # unsaid formats are the family's (fp32, Qwen-Image's int4: a 20B model exists for a CPU only at 4 bits)
    defaults = registry.family(src.family).default_weights
    weights = weights or defaults.get("denoiser", "fp32")
    text_encoder_weights = text_encoder_weights or defaults.get("text_encoder", "fp32")
    if weights == "int8-static" and src.family not in streaming.UNET_FAMILIES:
        raise ExportError(
            f"--weights int8-static calibrates a UNet (SD 1.5, SDXL and their LCM, Turbo, Lightning) by sampling "
            f"the whole pipeline; {src.family} is exported without loading it: export with --weights int8"
        )
    model = _registry_model(model_id, src) if model_id else _auto_model(src)
    final = Path(out).expanduser() if out else registry.models_home() / (model.id if model else src.name)
    final = final.absolute()
    _check_destination(final)
    if src.family == deepfloyd_if.FAMILY:
        if unet or lora or vae_weights != "fp32":
            raise ExportError("--unet, --lora and --vae-weights do not apply to DeepFloyd IF; export without them")
        return deepfloyd_if.export_cascade(
            src,
            stage_2=stage_2,
            stage_3=stage_3,
            final=final,
            model=model,
            weights=weights,
            text_encoder_weights=text_encoder_weights,
            opset=opset,
            fuse=fuse,
            say=say,
        )
    if stage_2 is not None or stage_3 is not None:
        raise ExportError(f"--stage-2/--stage-3 name a cascade's later stages; {src.spec} is a {src.family} model")

    unet_spec = unet
    if unet_spec is None and model is not None and model.parts.get("unet"):
        if src.random_weights:
            say(f"note: not applying {model.id}'s UNet part to the random weights of {src.spec}")
        else:
            unet_spec = model.parts["unet"]

    # parts are fetched before the pipeline is loaded: a missing file fails in a second, not minutes
    unet_file = parts.fetch(unet_spec, "UNet") if unet_spec else None
    lora_file = parts.fetch(lora, "LoRA") if lora else None
    streamed = streaming.streamed_source(
        src.family,
        src.kind,
        parts=bool(unet_file or lora_file),
        weights=weights,
        vae_weights=vae_weights,
        text_encoder_weights=text_encoder_weights,
    )
    if (unet_file or lora_file) and src.kind != "tiny" and src.family in streaming.STREAMED_FAMILIES:
        raise ExportError(
            f"--{'lora' if lora_file else 'unet'} needs the weights in memory, and {src.family} checkpoints are "
            f"exported without loading them; fuse it into the checkpoint first (diffusers: fuse_lora, save_pretrained)"
        )
    if not streamed and (weights == "int8-static" or vae_weights != "fp32") and src.kind != "tiny":
        sources.fetch(src)
        if weights == "int8-static":
            _check_static_unet_memory(src)
        if vae_weights != "fp32":
            _check_calibration_memory(src)
    say(f"loading {src.spec} ({src.pipeline_class}, family {src.family})")
    with backends.quiet():
        pipeline = sources.load(src, streamed=streamed)
    _check_policy(model, src, pipeline)
    if src.family == "hidream" and getattr(pipeline, "text_encoder_4", None) is None:
        raise ExportError(
            f"{src.spec} has no text_encoder_4 (HiDream's Llama-3.1-8B-Instruct, which its hub repos leave out); "
            f"put meta-llama/Llama-3.1-8B-Instruct in the folder as text_encoder_4/ and tokenizer_4/, list them in "
            f"model_index.json, and export the folder"
        )
    if cache_graphs:
        _check_cache_graphs(pipeline, src, weights)
    if unet_file:
        say(f"applying UNet weights {unet_spec}")
        parts.apply_unet(pipeline, unet_file)
    if lora_file:
        say(f"fusing LoRA {lora} (scale {lora_scale:g})")
        with backends.quiet():
            parts.apply_lora(pipeline, lora_file, lora_scale)

    scheduler = scheduler_config(pipeline, model)
    config = pipeline_config(pipeline, src.family, scheduler)
    rewrite = _Rewrite(fuse, weights, vae_weights, text_encoder_weights, streamed=streamed)
    # a UNet pipeline in memory: its static int8 modes (UNet, VAE decoder) are calibrated by sampling it
    unet_pipeline = getattr(pipeline, "unet", None) is not None and not streamed
    if text_encoder_weights != "fp32" and not any(rewrite.streamed(m) for m in _big_text_encoders(pipeline)):
        raise ExportError(
            f"--text-encoder-weights {text_encoder_weights} applies to T5-XXL (SD 3, FLUX, HiDream), Qwen2.5-VL "
            f"(Qwen-Image) and Llama-3.1 (HiDream), which {src.spec} does not have; export without it"
        )
    # a transformer pipeline is not sampled in PyTorch (its denoiser is streamed): its decoder is calibrated on
    # its own encoder's latents of synthetic images (exporters/calibrate.py)
    encoder_calibrated = vae_weights != "fp32" and not unet_pipeline
    if encoder_calibrated and type(pipeline.vae).__name__ != "AutoencoderKL":
        raise ExportError(  # the encoder-latent calibration below is AutoencoderKL's (2-D latents)
            f"--vae-weights {vae_weights} quantizes an AutoencoderKL decoder; {src.family}'s VAE is a "
            f"{type(pipeline.vae).__name__}: export with --vae-weights fp32"
        )
    calibrated = {"weights": weights == "int8-static", "vae-weights": vae_weights != "fp32"}
    if (
        unet_pipeline
        and any(calibrated.values())
        and pipeline.unet.config.in_channels != pipeline.vae.config.latent_channels
    ):
        flags = " ".join(f"--{flag} fp32" for flag, on in calibrated.items() if on)
        raise ExportError(
            f"static int8 is calibrated by text-to-image sampling, which a {pipeline.unet.config.in_channels}-channel "
            f"UNet ({src.pipeline_class}: latents, mask and masked-image latents) cannot do; export with {flags}"
        )
    if encoder_calibrated:
        with backends.quiet():
            say("calibrating: decoding the VAE encoder's latents of synthetic images")
            finals = calibrate.encoded_latents(pipeline)
            rewrite.trajectories["vae_decoder"] = calibrate.vae_decoder_trajectory(pipeline, finals)
    elif any(calibrated.values()):
        # before any component is exported and freed: the whole pipeline samples. Its UNet inputs calibrate
        # the int8-static convolutions and, with the UNet's outputs, measure the quantized UNet; its final
        # latents do the same for the VAE decoder.
        with backends.quiet():
            unet_trajectory, finals = calibrate.unet_trajectory(
                pipeline,
                steps=model.default_steps if model else calibrate.MAX_STEPS,
                # a registry model samples with its own guidance (Turbo's 0: no CFG batch) and scheduler
                guidance=model.guidance if model else None,
                scheduler=scheduler,
                progress=say,
            )
            if weights == "int8-static":
                rewrite.trajectories["unet"] = unet_trajectory
            if vae_weights != "fp32":
                say("calibrating: decoding the sampled latents")
                rewrite.trajectories["vae_decoder"] = calibrate.vae_decoder_trajectory(pipeline, finals)
    final.parent.mkdir(parents=True, exist_ok=True)
    reclaimed = reclaim_leftovers(final.parent)
    if reclaimed:
        count, size = reclaimed
        say(f"removed {count} folder(s) left by killed exports ({size / 2**20:,.0f} MB reclaimed)")
    # the owner's PID is in the name, so a later export can tell a killed one's folder from a running one's
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        _write_static(pipeline, src, tmp, scheduler)
        try:
            # a pipeline whose big components were not loaded exports the rest with plain torch.onnx
            # optimum (2.1) has no Qwen-Image configs: its VAE is exported with plain torch.onnx too
            # and HiDream's four encoders and MoE transformer (optimum has no HiDream configs)
            plain = sources.has_meta(pipeline) or src.family in ("qwen-image", "hidream")
            backend = backends.make(False if plain else use_optimum, pipeline)
        except Exception as exc:
            raise ExportError(
                f"optimum cannot prepare this {type(pipeline).__name__} ({type(exc).__name__}: {_first_line(exc)}); "
                f"try the plain torch.onnx exporter (stepwise export --no-optimum)"
            ) from exc
        composed = None
        if cache_graphs:  # the whole denoiser's test inputs, taken before the export frees its module
            cls = type(_denoiser(pipeline)).__name__
            whole_inputs = components.make(pipeline, split.SPLITS[cls][0]).make_inputs
        entries = _export_components(pipeline, backend, tmp, opset, say, rewrite, src, cache_graphs)
        if cache_graphs:
            composed = _check_composed(tmp, entries, cls, whole_inputs, say)
        data = {
            "model_id": model.id if model else None,
            "family": src.family,
            "source": src.spec,
            "random_weights": src.random_weights,
            "parts": {"unet": unet_spec, "lora": lora, "lora_scale": lora_scale if lora else None},
            "scheduler_source": f"registry:{model.id}" if model else "checkpoint",
            "opset": opset,
            "precision": weights,
            "vae_precision": vae_weights,
            "text_encoder_precision": text_encoder_weights,
            "exporter": backend.name,
            "components": entries,
            **({"cache_graphs": composed} if composed else {}),
            "config": config,
        }
        commit(tmp, final, data, started)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"exported {src.spec} to {final} in {time.monotonic() - started:.1f}s")
    return final


def commit(tmp: Path, final: Path, data: dict, started: float) -> None:
    """Stamp the manifest (versions, time, duration), write it, and move the validated folder into place."""
    data = {
        **data,
        "versions": _versions(),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "export_seconds": round(time.monotonic() - started, 1),
    }
    manifest_io.write(tmp, data)
    replace_folder(tmp, final)


def _check_static_unet_memory(src) -> None:
    """Refuse, before loading anything, a --weights int8-static export this machine's memory cannot hold (SDXL's
    needs ~50 GB): it would be killed after minutes of work. The weight-only int8 needs no such memory."""
    folder = src.folder / "unet" if src.folder else None
    if folder is None or not any(folder.glob("*.safetensors")):
        return
    params = streaming.SafetensorsWeights(folder).params()
    need_mb = CALIBRATED_INT8_PEAK_PER_UNET_BYTE * 4 * params / 2**20
    available = available_memory_mb()
    if available is not None and need_mb > available:
        raise ExportError(
            f"--weights int8-static calibrates on the whole pipeline in memory: about {need_mb / 1024:.0f} GB for "
            f"this {params / 1e9:.1f} B-parameter UNet, and {available / 1024:.0f} GB is available; export with "
            f"--weights int8 (weight-only, streamed, under 6 GB), or on a machine with more memory"
        )


def _check_calibration_memory(src) -> None:
    """Refuse, before loading anything, a calibrated --vae-weights int8 export this machine's memory cannot hold
    (SDXL's pipeline is 14 GB in fp32): it would be killed after minutes of work."""
    if src.folder is None:
        return
    params = sum(
        streaming.SafetensorsWeights(folder).params()
        for folder in src.folder.iterdir()
        if folder.is_dir() and any(folder.glob("*.safetensors"))
    )
    need_mb = CALIBRATED_VAE_PEAK_PER_PIPELINE_BYTE * 4 * params / 2**20
    available = available_memory_mb()
    if params and available is not None and need_mb > available:
        raise ExportError(
            f"--vae-weights int8 calibrates on the whole pipeline in memory: about {need_mb / 1024:.0f} GB for "
            f"this {params / 1e9:.1f} B-parameter pipeline, and {available / 1024:.0f} GB is available; export with "
            f"--vae-weights fp32 (streamed, under 6 GB), or on a machine with more memory"
        )


# --- the components --------------------------------------------------------------------------------


class _Rewrite:
    """What happens to a graph between export and validation: the CPU attention fusion (UNets), the
    denoiser's weight precision, the VAE decoder's. ``trajectories``: component → (inputs, PyTorch outputs)
    recorded while the pipeline sampled, which calibrate and then measure a quantized graph."""

    def __init__(
        self, fuse: bool, weights: str, vae_weights: str, text_encoder_weights: str = "fp32", *, streamed: bool = False
    ):
        self.fuse, self.weights, self.vae_weights = fuse, weights, vae_weights
        self.text_encoder_weights = text_encoder_weights
        self.stream = streamed
        self.trajectories: dict[str, list] = {}

    def precision(self, name: str) -> str:
        if name in DENOISER_GRAPHS:
            return self.weights
        return self.vae_weights if name == "vae_decoder" else "fp32"

    def streamed(self, module) -> bool:
        """Exported by exporters.streaming: the denoiser and text encoders of a streamed source, and an int8 UNet
        from any source (weight-only int8, written from the checkpoint or from the module in memory)."""
        unet_int8 = self.weights == "int8" and type(module).__name__ == "UNet2DConditionModel"
        return (self.stream or unet_int8) and streaming.streams(module)

    def streamed_format(self, name: str, module) -> str:
        if name in DENOISER_GRAPHS:
            return self.weights
        return self.text_encoder_weights if type(module).__name__ in BIG_TEXT_ENCODERS else "fp32"

    def apply(self, name: str, kind: str, path: Path, say) -> dict:
        data_name = path.name + backends.DATA_SUFFIX
        done = {}
        if self.fuse and kind in ("unet", "unet-deep", "unet-shallow"):
            say("fusing unet attention for the CPU (onnxruntime.transformers + MultiHeadAttention)")
            try:
                done["fusion"] = optimize.fuse_unet_for_cpu(path, data_name)
            except Exception as exc:  # the optimizer's pattern matching is not ours to fix: keep the plain graph
                say(f"note: attention fusion skipped ({type(exc).__name__}: {_first_line(exc)})")
        weights = self.precision(name)
        if weights == "fp32":
            return done
        say(f"quantizing {name} to {weights}")
        samples = [feeds for feeds, _ in self.trajectories.get(name, ())]
        try:
            if name in DENOISER_GRAPHS:  # int8-static or int4 in memory (int8: exporters.streaming)
                done["quantization"] = quantize.quantize(path, data_name, weights, samples)
            else:
                done["quantization"] = quantize.int8_convs(path, data_name, samples)
        except Exception as exc:
            raise ExportError(
                f"quantizing {name} to {weights} failed ({type(exc).__name__}: {_first_line(exc)}); {self.fix(name)}"
            ) from exc
        return done

    def tolerances(self, name: str) -> dict:
        weights = self.precision(name)
        if weights == "fp32":
            return {}
        return {"min_snr_db": MIN_SNR_DB[weights], "trajectory": self.trajectories.get(name)}

    def fix(self, name: str) -> str:
        return "export with --weights fp32" if name in DENOISER_GRAPHS else "export with --vae-weights fp32"


# text encoders big enough for --text-encoder-weights (T5-XXL 4.8 B, Qwen2.5-VL 8.3 B parameters)
BIG_TEXT_ENCODERS = (
    "T5EncoderModel",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen2_5_VLTextModel",
    "LlamaForCausalLM",  # HiDream's Llama-3.1-8B (the component's module is its LlamaModel)
    "LlamaModel",
)


def _big_text_encoders(pipeline) -> list:
    modules = [getattr(pipeline, name, None) for name in TEXT_ENCODERS]
    return [m for m in modules if type(m).__name__ in BIG_TEXT_ENCODERS]


def _denoiser(pipeline):
    return getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)


def _check_cache_graphs(pipeline, src, weights: str) -> None:
    denoiser = _denoiser(pipeline)
    if type(denoiser).__name__ not in split.SPLIT_CLASSES:
        raise ExportError(
            f"--cache-graphs splits the FLUX, SD 3 and Qwen-Image transformers and the SD 1.5/SDXL UNet for step "
            f"caching; {src.family} has no cache mode that needs its denoiser split: export without --cache-graphs"
        )
    if len(getattr(denoiser, "transformer_blocks", ())) + len(getattr(denoiser, "single_transformer_blocks", ())) == 1:
        raise ExportError(  # the split puts the first block in one graph and the rest in another
            "--cache-graphs needs a transformer of two blocks or more (this one has one); export without --cache-graphs"
        )
    if weights in ("int8", "int8-static") and getattr(pipeline, "unet", None) is not None:
        raise ExportError(
            f"--cache-graphs with --weights {weights}: a UNet's int8 is written (or calibrated) for the whole graph "
            f"only, not its split parts; export with --weights fp32 or int4, or without --cache-graphs"
        )


def _check_composed(folder: Path, entries: dict, cls: str, make_inputs, say) -> dict:
    """The split graphs composed against the whole graph, in onnxruntime, on the whole graph's test inputs:
    together they are the denoiser. Skipped (and said) when the denoiser is too big to hold twice."""
    whole_name, output, names = split.SPLITS[cls]
    result = {"graphs": list(names), "whole": whole_name}
    bytes_ = sum(entries[n].get("data_bytes", entries[n]["bytes"]) for n in (whole_name, *names))
    if bytes_ > 2 * streaming.FULL_VALIDATION_BYTES:
        result["composed"] = "not run: the whole and the split graphs are too big to hold together"
        say("note: the split graphs were validated one by one, not composed against the whole (too big)")
        return result
    sessions = {n: validate.session(folder / entries[n]["path"]) for n in (whole_name, *names)}

    def run(name, feeds):
        sess = sessions[name]
        outs = [o.name for o in sess.get_outputs()]
        return dict(zip(outs, sess.run(outs, validate.feeds_for(sess, feeds)), strict=True))

    worst: dict[str, float] = {}
    largest = 0.0
    for case in ("a", "b"):
        feeds = make_inputs(case)
        whole = run(whole_name, feeds)[output]
        for way, got in split.compose(cls, run, feeds).items():
            worst[way] = max(worst.get(way, 0.0), float(np.max(np.abs(got.astype(np.float64) - whole))))
        largest = max(largest, float(np.max(np.abs(whole))))
    tolerance = components.ATOL + components.RTOL * largest
    for way, diff in worst.items():
        if not diff <= tolerance:
            raise ExportError(
                f"validating the step-cache graphs failed: composed as {way} they differ from the whole "
                f"{whole_name} by {diff:.1e} (tolerance {tolerance:.1e}); report it, or export without --cache-graphs"
            )
    measured = _measured({"max_abs_diff": max(worst.values()), "tolerance": tolerance})
    say(f"validating the step-cache graphs composed against the whole: {measured}")
    composed = {"max_abs_diff": max(worst.values()), "tolerance": tolerance}
    return {**result, "composed": {**composed, "max_abs_diff_each": worst}}


def _export_components(
    pipeline,
    backend,
    folder: Path,
    opset: int,
    say,
    rewrite: _Rewrite,
    src,
    cache_graphs: bool = False,
    only: tuple[str, ...] | None = None,
) -> dict:
    """``only``: the components to export, when not all of them (DeepFloyd IF's stage III needs no VAE encoder)."""
    names = [n for n in components.component_names(pipeline) if only is None or n in only]
    todo = [components.make(pipeline, name) for name in names]
    if cache_graphs:  # right after the whole denoiser, while its module is still held
        denoiser = _denoiser(pipeline)
        at = next(i for i, c in enumerate(todo) if c.name in DENOISERS) + 1
        options = components.unet_options(pipeline) if getattr(pipeline, "unet", None) is not None else {}
        todo[at:at] = split.graphs(denoiser, **options)
    entries = {}
    while todo:
        component = todo.pop(0)
        name, kind = component.name, component.kind
        path = folder / name / "model.onnx"
        params = component.params
        if rewrite.streamed(component.module):
            entries[name] = _share_weights(
                folder, entries, name, _export_streamed(component, folder, opset, say, rewrite, src)
            )
            del component
            _release(pipeline, name, todo)
            gc.collect()
            continue
        say(f"exporting {name}")
        try:
            refs = validate.references(component)
        except Exception as exc:
            raise ExportError(
                f"running {name} in PyTorch on test inputs failed ({type(exc).__name__}: {_first_line(exc)}); "
                f"the checkpoint does not load as a standard {type(pipeline).__name__}"
            ) from exc
        try:
            # optimum knows the pipeline's own components only: the split graphs are traced by torch.onnx
            (backends.TorchOnnx() if name in split.GRAPHS else backend).export(component, path, opset)
        except ExportError:
            raise
        except Exception as exc:
            advice = _disk_advice(exc, folder) or _other_exporter(backend)
            raise ExportError(f"exporting {name} failed ({type(exc).__name__}: {_first_line(exc)}); {advice}") from exc
        # free the PyTorch module before onnxruntime loads the graph
        names = validate.Names(component)
        backend.release(name)
        del component
        _release(pipeline, name, todo)
        if params > BIG_COMPONENT:
            gc.collect()
        rewritten = rewrite.apply(name, kind, path, say)
        tolerances = rewrite.tolerances(name)
        try:
            result = validate.check(names, path, refs, **tolerances)
        except validate.ValidationFailed as exc:
            fix = rewrite.fix(name) if tolerances else _other_exporter(backend)
            raise ExportError(f"validating {name} failed: {exc}; {fix}") from None
        say(f"validating {name}: {_measured(result)}")
        entries[name] = _share_weights(folder, entries, name, {**_entry(name, path, params, result), **rewritten})
    return entries


def _share_weights(folder: Path, entries: dict, name: str, entry: dict) -> dict:
    """A validated step-cache graph whose weights are all the whole denoiser's reads them from its data file
    (exporters/shared_weights.py): its entry then names that file's size and hash."""
    whole = split.WEIGHTS_OF.get(name)
    if whole not in entries or "data_path" not in entry or "data_path" not in entries[whole]:
        return entry
    path = folder / entry["path"]
    read = shared_weights.share(path, folder / entries[whole]["path"])
    if read is None:
        return entry
    data = {key: entries[whole][key] for key in ("data_bytes", "data_sha256")}
    # data_read_bytes: what the memory estimate counts (the predict graph reads no attention weights)
    shared = {"data_shared_with": whole, "data_read_bytes": read}
    return {**entry, "bytes": path.stat().st_size, "sha256": manifest_io.sha256_of(path), **data, **shared}


def _export_streamed(component, folder: Path, opset: int, say, rewrite: _Rewrite, src) -> dict:
    """Trace on the meta device, write the weights one tensor at a time, validate (exporters.streaming)."""
    name = component.name
    path = folder / name / "model.onnx"
    fmt = rewrite.streamed_format(name, component.module)
    params = component.params
    try:
        # the split graphs read the whole denoiser's weights
        folder_name = split.SPLITS[type(component.module).__name__][0] if name in split.GRAPHS else name
        checkpoint = streaming.weights_source(component.module, src.folder / folder_name if src.folder else None)
    except FileNotFoundError as exc:
        raise ExportError(f"{name}: {exc}; export from a diffusers folder saved with safetensors") from None
    if component.kind == qwen_image.TEXT_KIND:  # the checkpoint names the language model's tensors its own way
        checkpoint = qwen_image.TextWeights(checkpoint)
    if component.kind == hidream_text.LLAMA_KIND:  # LlamaForCausalLM's checkpoint: model.layers.N...
        checkpoint = hidream_text.LlamaWeights(checkpoint)
    bar = _Bar(say if params > BIG_COMPONENT else None, f"writing {name} ({_count(params)} parameters, {fmt})")
    try:
        say(f"exporting {name}: tracing on the meta device (no weights in memory)")
        written = streaming.export(component, checkpoint, path, opset=opset, fmt=fmt, progress=bar, fuse=rewrite.fuse)
        tolerances = {"min_snr_db": weight_formats.MIN_SNR_DB[kind_of(component)][fmt]} if fmt != "fp32" else {}
        say(f"validating {name} against PyTorch")
        result = reduced.check(
            component, checkpoint, path, opset=opset, fmt=fmt, tolerances=tolerances, fuse=rewrite.fuse
        )
    except validate.ValidationFailed as exc:
        flag = "--weights" if name in DENOISER_GRAPHS else "--text-encoder-weights"
        fix = f"export with {flag} fp32" if fmt != "fp32" else "report it: the streamed graph differs from PyTorch"
        raise ExportError(f"validating {name} failed: {exc}; {fix}") from None
    except ExportError:
        raise
    except Exception as exc:
        advice = _disk_advice(exc, folder) or "report it, with the checkpoint's config.json"
        raise ExportError(f"exporting {name} failed ({type(exc).__name__}: {_first_line(exc)}); {advice}") from exc
    finally:
        checkpoint.close()
    say(f"validating {name} ({result['compared']}): {_measured(result)}")
    return {
        **_entry(name, path, params, result),
        "exporter": "torch.onnx dynamo, streamed (meta-device trace, weights written one tensor at a time)",
        "opset": max(opset, streaming.MIN_DYNAMO_OPSET),
        "weights": {
            "format": fmt,
            "detail": weight_formats.describe(fmt, written.int8_convs),
            "linear_weights": written.formats,
            "int8_convs": written.int8_convs,
            "bf16_embeddings": written.bf16_embeddings,
            # the memory estimate leaves these out: a lookup table's mapped pages are read only where looked up
            "bf16_embedding_bytes": written.bf16_embedding_bytes,
        },
        # the engine's memory estimate reads this: fused attention never materialises its scores
        "fusion": {"multi_head_attention": written.fused_attention},
    }


def _measured(result: dict) -> str:
    """The validation's outcome for the progress line."""
    if "snr_db" in result:
        return f"SNR {result['snr_db']:.1f} dB against PyTorch (minimum {result['min_snr_db']:g})"
    return f"max|diff| {result['max_abs_diff']:.1e} (tolerance {result['tolerance']:.1e})"


def _entry(name: str, path: Path, params: int, result: dict) -> dict:
    """A validated graph's manifest entry: its files with sizes and hashes, its signature, the validation."""
    graph = result.pop("graph")
    entry = {
        "path": f"{name}/model.onnx",
        "bytes": path.stat().st_size,
        "sha256": manifest_io.sha256_of(path),
        "params": params,
        "inputs": graph["inputs"],
        "outputs": graph["outputs"],
        "validation": result,
    }
    data = path.with_name(path.name + backends.DATA_SUFFIX)
    if data.is_file():
        entry["data_path"] = f"{name}/{data.name}"
        entry["data_bytes"] = data.stat().st_size
        entry["data_sha256"] = manifest_io.sha256_of(data)
    return entry


def kind_of(component) -> str:
    return "denoiser" if component.name in DENOISER_GRAPHS else "text_encoder"


def _count(params: int) -> str:
    return f"{params / 1e9:.2f} B" if params >= 1e9 else f"{params / 1e6:.0f} M"


class _Bar:
    """Progress of the tensor-by-tensor weight writing (minutes for a big model): a line every 10%."""

    def __init__(self, say, label: str):
        self.say, self.label, self.shown = say, label, -1

    def __call__(self, done: int, total: int) -> None:
        tenth = done * 10 // max(total, 1)
        if self.say is not None and tenth != self.shown:
            self.shown = tenth
            self.say(f"{self.label}: [{'#' * tenth}{'.' * (10 - tenth)}] {done}/{total} tensors")


def _disk_advice(exc: BaseException, folder: Path) -> str | None:
    """A full disk anywhere in the chain of causes gets disk advice, not advice about exporters."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC or "No space left on device" in str(seen):
            free = shutil.disk_usage(folder).free / 2**30 if folder.exists() else 0.0
            where = folder.parent
            return f"the disk is full ({free:.1f} GB free in {where}): free space, or export elsewhere with --out"
        seen = seen.__cause__ or seen.__context__
    return None


def _other_exporter(backend) -> str:
    if backend.name == "optimum":
        return "try the plain torch.onnx exporter (stepwise export --no-optimum), or another opset"
    return "try optimum's exporter (pip install 'stepwise[export]', without --no-optimum), or another opset"


def _release(pipeline, name: str, todo: list) -> None:
    """Drop the pipeline's reference to a module no remaining component needs."""
    remaining = {c.name for c in todo}
    attr = "vae" if name.startswith("vae_") else name
    if attr == "vae" and remaining & {"vae_encoder", "vae_decoder"}:
        return
    if getattr(pipeline, attr, None) is not None:
        try:
            setattr(pipeline, attr, None)
        except Exception:  # a pipeline that refuses None keeps the module; memory only
            pass


# --- files besides the graphs ----------------------------------------------------------------------


def scheduler_config(pipeline, model) -> dict:
    """The registry entry's scheduler config (the checkpoint's plus its model card's overrides, e.g.
    SDXL-Lightning's trailing timesteps on SDXL base's scheduler) when tied to one; else the checkpoint's."""
    if model is not None and model.scheduler.get("_class_name"):
        return dict(model.scheduler)
    return json.loads(pipeline.scheduler.to_json_string())  # what save_pretrained writes


def _write_static(pipeline, src, folder: Path, scheduler: dict) -> None:
    """model_index.json, scheduler, tokenizers and each component's config.json."""
    index = src.folder / "model_index.json" if src.folder else None
    if index is not None and index.is_file():
        shutil.copy2(index, folder / "model_index.json")
    else:
        pipeline.save_config(str(folder))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2, sort_keys=True) + "\n")
    for name in TOKENIZERS:
        tokenizer = getattr(pipeline, name, None)
        if tokenizer is not None:
            save_tokenizer(tokenizer, folder / name)
    for name in components.component_names(pipeline):
        save_component_config(pipeline.vae if name.startswith("vae_") else getattr(pipeline, name), folder / name)


def save_component_config(module, folder: Path) -> None:
    """A component's config.json beside its graph."""
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(module, "save_config"):  # diffusers models
        module.save_config(str(folder))
    else:  # transformers models
        module.config.save_pretrained(str(folder))


def save_tokenizer(tokenizer, folder: Path) -> None:
    """The tokenizer's own files plus ``tokenizer.json`` (the fast tokenizer the engine reads)."""
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    if not (folder / "tokenizer.json").is_file():
        try:
            fast = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
        except Exception as exc:
            raise ExportError(
                f"cannot convert {folder.name} to a fast tokenizer ({_first_line(exc)}); "
                f"install sentencepiece and protobuf (pip install 'stepwise[export]')"
            ) from None
        if not fast.is_fast:
            raise ExportError(f"{folder.name} has no fast tokenizer; install sentencepiece and protobuf")
        fast.save_pretrained(str(folder))
    if not (folder / "tokenizer.json").is_file():
        raise ExportError(f"{folder.name}: transformers wrote no tokenizer.json; upgrade transformers")


# --- what the engine needs without torch -----------------------------------------------------------


def pipeline_config(pipeline, family: str, scheduler: dict) -> dict:
    vae = _vae_fields(pipeline.vae)
    den_name, den = parts.denoiser(pipeline)
    dcfg = den.config
    vae_scale_factor = vae["vae_scale_factor"]
    encoders = {n: getattr(pipeline, n) for n in TEXT_ENCODERS if getattr(pipeline, n, None) is not None}
    tokenizers = {n: getattr(pipeline, n) for n in TOKENIZERS if getattr(pipeline, n, None) is not None}
    guidance_embeds = bool(getattr(dcfg, "guidance_embeds", False))
    t5 = any(type(m).__name__ == "T5EncoderModel" for m in encoders.values())
    seq_key = "flux-guidance" if family == "flux" and guidance_embeds else family
    default_sample = getattr(pipeline, "default_sample_size", None) or getattr(dcfg, "sample_size", None)
    config = {
        "pipeline_class": type(pipeline).__name__,
        "denoiser": den_name,
        "vae_scaling_factor": vae["vae_scaling_factor"],
        "vae_shift_factor": vae["vae_shift_factor"],
        "vae_scale_factor": vae_scale_factor,
        "latent_channels": vae["latent_channels"],
        "in_channels": int(dcfg.in_channels),
        "sample_size": int(dcfg.sample_size) if getattr(dcfg, "sample_size", None) else None,
        "default_image_size": int(default_sample) * vae_scale_factor if default_sample else None,
        "text_encoder_layers": {n: _layers(m) for n, m in encoders.items()},
        "text_encoder_hidden_size": {n: _hidden(m) for n, m in encoders.items()},
        "text_encoder_projection_dim": {
            n: int(m.config.projection_dim) for n, m in encoders.items() if type(m).__name__.endswith("Projection")
        },
        "tokenizer_max_length": {n: _max_length(t) for n, t in tokenizers.items()},
        # SD3 without T5 still pads the prompt states to the T5 window with zeros: the window is recorded anyway
        "max_sequence_length": T5_SEQUENCE_LENGTH.get(seq_key) if t5 or family == "sd3" else None,
        "time_cond_proj_dim": getattr(dcfg, "time_cond_proj_dim", None),
        "requires_aesthetics_score": bool(pipeline.config.get("requires_aesthetics_score", False)),
        "force_zeros_for_empty_prompt": bool(pipeline.config.get("force_zeros_for_empty_prompt", False)),
        "addition_embed_type": getattr(dcfg, "addition_embed_type", None),
        "addition_time_embed_dim": getattr(dcfg, "addition_time_embed_dim", None),
        "cross_attention_dim": getattr(dcfg, "cross_attention_dim", None),
        "patch_size": getattr(dcfg, "patch_size", None) if den_name == "transformer" else None,
        "guidance_embeds": guidance_embeds,
        "joint_attention_dim": getattr(dcfg, "joint_attention_dim", None),
        "pooled_projection_dim": getattr(dcfg, "pooled_projection_dim", None),
        "axes_dims_rope": list(dcfg.axes_dims_rope) if getattr(dcfg, "axes_dims_rope", None) else None,
        # how the pipeline feeds timesteps: UNets a scalar t, SD3 a (B,) t, FLUX a (B,) t / 1000
        "timestep_shape": "scalar" if den_name == "unet" else "batch",
        "timestep_scale": 0.001 if family in ("flux", "qwen-image") else 1.0,
        "scheduler_class": scheduler.get("_class_name"),
        "prediction_type": scheduler.get("prediction_type"),
        # what the engine's memory estimate and tiled VAE need (engine/memory.py, engine/vae.py)
        "vae_sample_size": vae["vae_sample_size"],
        "vae_block_out_channels": vae["vae_block_out_channels"],
        "vae_mid_block_attention": vae["vae_mid_block_attention"],
        "denoiser_attention": _attention_layout(den_name, den, family, T5_SEQUENCE_LENGTH.get(seq_key, 0), tokenizers),
    }
    if family == "qwen-image":
        config.update(_qwen_image_fields(pipeline, vae))
    if family == "hidream":
        config.update(_hidream_fields(pipeline))
    return config


def _vae_fields(vae) -> dict:
    """The VAE's constants: AutoencoderKL's, or AutoencoderKLQwenImage's (per-channel latent statistics, a
    causal 3-D VAE whose spatial scale is 2 ** its number of downsamples)."""
    cfg = vae.config
    if type(vae).__name__ == "AutoencoderKLQwenImage":
        return qwen_image.vae_config_keys(vae)
    shift = getattr(cfg, "shift_factor", None)
    return {
        "vae_scaling_factor": float(cfg.scaling_factor),
        "vae_shift_factor": float(shift) if shift is not None else None,
        "vae_scale_factor": 2 ** (len(cfg.block_out_channels) - 1),
        "latent_channels": int(cfg.latent_channels),
        "vae_sample_size": _first(cfg.sample_size),  # AutoencoderKL's tile_sample_min_size
        "vae_block_out_channels": [int(c) for c in cfg.block_out_channels],
        "vae_mid_block_attention": bool(getattr(cfg, "mid_block_add_attention", True)),
    }


def _qwen_image_fields(pipeline, vae: dict) -> dict:
    """QwenImagePipeline's constants the engine needs: its prompt template and the tokens it drops, the
    prompt windows, the rotary axes (the tables are computed by the engine and fed to the graph)."""
    cfg = pipeline.transformer.config
    return {
        "prompt_template": pipeline.prompt_template_encode,
        "prompt_template_start_idx": int(pipeline.prompt_template_encode_start_idx),
        "pipeline_tokenizer_max_length": int(pipeline.tokenizer_max_length),
        "max_sequence_length": QWEN_MAX_SEQUENCE_LENGTH,
        "attention_head_dim": int(cfg.attention_head_dim),
        "rope_theta": 10000,  # QwenImageTransformer2DModel builds QwenEmbedRope(theta=10000, ..., scale_rope=True)
        "scale_rope": True,
        # the VAE's per-channel statistics, in place of a scaling factor (engine/vae.Vae)
        "vae_latents_mean": vae["vae_latents_mean"],
        "vae_latents_std": vae["vae_latents_std"],
    }


def _hidream_fields(pipeline) -> dict:
    """HiDreamImagePipeline's constants: its prompt windows, the area every request is rescaled to
    (``default_sample_size`` latent pixels a side), and the transformer's token layout (non-square latents are
    padded to ``max_seq`` tokens; ``llama_layers`` index the Llama states it takes)."""
    from .hidream import text, transformer

    cfg = pipeline.transformer.config
    return {
        "max_sequence_length": text.MAX_SEQUENCE_LENGTH,
        "clip_max_length": text.CLIP_MAX_LENGTH,
        "default_sample_size": int(pipeline.default_sample_size),
        "max_seq": transformer.max_seq(cfg),
        "llama_layers": [int(k) for k in cfg.llama_layers],
        "llama_states": max(cfg.llama_layers) + 1,
    }


# QwenImagePipeline.__call__'s max_sequence_length default (its tokenizer window is 1024 + the dropped prefix)
QWEN_MAX_SEQUENCE_LENGTH = 512


def _first(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _attention_layout(den_name: str, den, family: str, t5_tokens: int, tokenizers: dict) -> dict:
    """The denoiser's largest self-attention, for the memory estimate: its tokens are (h / stride) x (w / stride)
    latent pixels plus ``joint_tokens`` of text (SD3, FLUX attend jointly), with ``heads`` heads; ``width`` is the
    channels (UNet: of its first block, at full latent size) or hidden size (transformer) activations carry."""
    cfg = den.config
    if den_name == "unet":
        stride, heads = None, None
        for level, block in enumerate(den.down_blocks):  # the first block with attention has the most tokens
            attentions = getattr(block, "attentions", None)
            if attentions and _self_attends(attentions[0]):  # Transformer2DModel (or a bare Attention): its heads
                stride = 2**level
                heads = next(m.heads for m in attentions[0].modules() if isinstance(getattr(m, "heads", None), int))
                break
        return {"stride": stride, "heads": heads, "joint_tokens": 0, "width": int(cfg.block_out_channels[0])}
    heads = int(cfg.num_attention_heads)
    text = t5_tokens  # T5's window (zeros in its place without T5), then SD3 puts CLIP's before it
    if family == "qwen-image":  # the prompt's states, at most its window
        text = QWEN_MAX_SEQUENCE_LENGTH
    if family == "hidream":  # T5's 128 tokens and two Llama layers' 128 each attend with the image
        text = 3 * 128
    if family == "sd3":
        text += _max_length(tokenizers["tokenizer"]) or 77
    # FLUX packs 2x2 latent pixels into a token before its patch embedding (patch_size 1)
    stride = int(cfg.patch_size) * (2 if family == "flux" else 1)
    return {"stride": stride, "heads": heads, "joint_tokens": text, "width": heads * int(cfg.attention_head_dim)}


def _self_attends(attention) -> bool:
    """Whether a UNet level's attention attends over its image tokens: a Transformer2DModel whose blocks are all
    ``only_cross_attention`` (the SD x4 upscaler's first three levels) attends to the text alone."""
    blocks = getattr(attention, "transformer_blocks", None)
    return not blocks or not all(getattr(b, "only_cross_attention", False) for b in blocks)


def _layers(module) -> int:
    cfg = module.config
    return int(getattr(cfg, "num_hidden_layers", None) or cfg.num_layers)


def _hidden(module) -> int:
    cfg = module.config
    return int(getattr(cfg, "hidden_size", None) or cfg.d_model)


def _max_length(tokenizer) -> int | None:
    length = getattr(tokenizer, "model_max_length", None)
    return int(length) if isinstance(length, int) and length < 1_000_000 else None


# --- registry --------------------------------------------------------------------------------------


def _family_models(family: str) -> str:
    return ", ".join(m.id for m in registry.all_models() if m.family == family) or "none"


def _registry_model(model_id: str, src):
    try:
        model = registry.get(model_id)
    except KeyError as exc:
        raise ExportError(f"{exc.args[0]}; pass one of them to --model, or leave --model out") from None
    if not registry.family(model.family).exportable:
        exportable = ", ".join(m.id for m in registry.all_models() if registry.family(m.family).exportable)
        raise ExportError(
            f"{model.id} is a {model.family} model, which Stepwise cannot export; exportable models: {exportable}"
        )
    if model.family != src.family:
        raise ExportError(
            f"--model {model.id} is a {model.family} model but {src.spec} is a {src.family} pipeline "
            f"({src.pipeline_class}); use a {src.family} model id ({_family_models(src.family)}) or another source"
        )
    return model


def _auto_model(src):
    """A hub source that is exactly one registry entry's checkpoint (and needs no parts) is that entry."""
    if src.kind != "hub":
        return None
    matches = [
        m
        for m in registry.all_models()
        if m.hub_id.lower() == src.repo.lower() and not m.parts and m.family == src.family
    ]
    return matches[0] if len(matches) == 1 else None


def _check_policy(model, src, pipeline) -> None:
    """The registry entry's guidance policy must fit the checkpoint (LCM's and FLUX-dev's embedding)."""
    if model is None:
        return
    den_name, den = parts.denoiser(pipeline)
    if den_name == "unet" and den.config.in_channels != pipeline.vae.config.latent_channels:
        # every registry entry is a text-to-image checkpoint: its policy and an engine run assume 4 input channels
        raise ExportError(
            f"--model {model.id} is a text-to-image model, but {src.spec} is a {src.pipeline_class} with a "
            f"{den.config.in_channels}-channel UNet (latents, mask, masked-image latents); export it without --model"
        )
    if den_name == "unet":
        embedded = getattr(den.config, "time_cond_proj_dim", None) is not None
        what = "a guidance-embedding UNet (time_cond_proj_dim, as LCM has)"
    else:
        embedded = bool(getattr(den.config, "guidance_embeds", False))
        what = "a guidance-embedding transformer (guidance_embeds, as FLUX.1-dev has)"
    if embedded != model.guidance_embedded:
        if model.guidance_embedded:
            problem = f"--model {model.id} expects {what}, but {src.spec} has none"
        else:
            problem = f"--model {model.id} expects no guidance embedding, but {src.spec} has {what}"
        raise ExportError(f"{problem}; use a matching model id ({_family_models(src.family)}) or another source")


# --- output folder ---------------------------------------------------------------------------------


def _check_destination(final: Path) -> None:
    if not final.exists():
        return
    if not final.is_dir():
        raise ExportError(f"{final} exists and is not a folder; pass another --out")
    if manifest_io.is_derived(final):  # someone's optimum export, which the engine loads as it is
        raise ExportError(
            f"{final} holds an ONNX export Stepwise did not write (its {registry.home.MANIFEST} is derived); "
            f"pass another --out, or remove that folder first"
        )
    if (final / registry.home.MANIFEST).is_file() or not any(final.iterdir()):
        return
    raise ExportError(
        f"{final} exists and is not a Stepwise export (no {registry.home.MANIFEST}); "
        f"pass another --out, or remove that folder first"
    )


_LEFTOVER = re.compile(r"^\..+\.(tmp|old)-(\d+)-[^/]+$")


def reclaim_leftovers(folder: Path) -> tuple[int, int] | None:
    """Remove the temporary folders of exports whose process is gone (SIGKILL, the OOM killer, a crash):
    ``.NAME.tmp-PID-XXXX`` and ``.NAME.old-PID-XXXX``. Returns (count, bytes) when anything was removed."""
    count = size = 0
    try:
        children = list(folder.iterdir())
    except OSError:
        return None
    for child in children:
        match = _LEFTOVER.match(child.name)
        if not match or not child.is_dir() or process_alive(int(match.group(2))):
            continue
        size += sum(f.stat().st_size for f in child.rglob("*") if f.is_file())
        shutil.rmtree(child, ignore_errors=True)
        count += 1
    return (count, size) if count else None


def _versions() -> dict:
    from importlib import metadata

    found = {}
    for dist in VERSIONED:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
