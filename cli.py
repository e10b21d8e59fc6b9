"""The ``stepwise`` command: models, export, generate (with per-step profiling), demo.

Every bad input ends in one line on stderr that names the problem and the fix, and a non-zero exit
(2 for input the user can correct), never a traceback. torch is imported only by ``export``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import click

import registry
from registry import cache as step_cache
from registry import policy, requests, timings
from registry.files import OutputError, atomic_write_text, check_output
from registry.manifest import ManifestError
from registry.policy import InputError

DEMO_MODEL = "sdxl-turbo"  # whose step policy the demo follows
DEMO_FOLDER = "demo-sdxl-turbo"  # its own folder in the models home: never a real model's id
DEMO_SOURCE = "tiny:sdxl"


class Failure(Exception):
    """A run that cannot go on, with a one-line message and an exit code."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def _fail(message: str, code: int = 1):
    raise Failure(message, code)


# ---------------------------------------------------------------- choosing a model


@dataclass
class Target:
    """What ``--model`` resolved to: the registry entry whose policy applies, and the export if any."""

    model: registry.Model
    family: registry.Family
    folder: Path | None  # the exported model, None when not exported yet
    label: str  # what to call it in messages and the timings file

    @property
    def weights(self) -> str | None:
        """The export's precision, e.g. "int8 weights, int8 VAE"; None when not exported."""
        if self.folder is None:
            return None
        from registry import manifest

        try:
            data = manifest.read(self.folder, check_files=False).data
        except ManifestError:
            return None
        text = f"{data.get('precision', 'fp32')} weights"
        t5 = data.get("text_encoder_precision", "fp32")
        if t5 != "fp32":
            text += f", {t5} T5"
        vae = data.get("vae_precision", "fp32")
        return text if vae == "fp32" else f"{text}, {vae} VAE"

    @property
    def random_weights(self) -> bool:
        """An export of randomly initialised weights (tiny:/random: builds): said in the plan and the PNG."""
        if self.folder is None:
            return False
        from registry import manifest

        try:
            return bool(manifest.read(self.folder, check_files=False).data.get("random_weights"))
        except ManifestError:
            return False

    @property
    def native_size(self) -> tuple[int, int] | None:
        """The export's own default size (sample_size x VAE factor), e.g. 64x64 for a tiny stand-in."""
        if self.folder is None:
            return None
        from registry import manifest

        try:
            size = manifest.read(self.folder, check_files=False).config.get("default_image_size")
        except ManifestError:
            return None
        return (int(size), int(size)) if size else None


def looks_like_path(spec: str) -> bool:
    """A folder is named as a path (a separator, or a leading "."); a bare name is a registry id or menu number."""
    return os.sep in spec or "/" in spec or spec.startswith(".") or spec.startswith("~")


def resolve_model(spec: str) -> Target:
    if not looks_like_path(spec):
        model = registry.find(spec)
        if model is not None:  # a registry id always means the registry model, whatever folders are around
            return Target(model, registry.family(model.family), registry.exported_path(model.id), model.id)
        ids = ", ".join(m.id for m in registry.all_models())
        folder = f"; to use the folder {spec}, pass ./{spec}" if Path(spec).is_dir() else ""
        _fail(f"unknown model {spec!r}; use a registry id ({ids}) or an exported folder{folder}", 2)
    from registry import manifest

    spec = str(Path(spec).expanduser())
    try:
        found = manifest.read(spec)
    except ManifestError as exc:
        _fail(str(exc), 2)
    fam = registry.family(found.family)
    model = registry.find(found.model_id) if found.model_id else None
    model = model or _policy_model(fam, found.data.get("config") or {})
    return Target(model, fam, Path(spec).resolve(), str(Path(spec).resolve()))


def _policy_model(fam, config: dict):
    """A folder tied to no registry model takes its family's policy model, unless the checkpoint's guidance
    embedding says otherwise: FLUX without it is schnell's (4 steps), not dev's; an LCM UNet is LCM's."""
    embedded = bool(config.get("guidance_embeds") or config.get("time_cond_proj_dim"))
    default = registry.get(fam.policy_model)
    if default.guidance_embedded == embedded:
        return default
    matching = [m for m in registry.all_models() if m.family == default.family and m.guidance_embedded == embedded]
    return matching[0] if matching else default


# ---------------------------------------------------------------- the plan


def _estimate(target: Target, steps: int, width: int, height: int, threads: int | None, full=None) -> str:
    """``full``: (fewest, most) steps run in full under a step cache; the rest are counted as free (a cached
    step runs the first block and the output layers only), so the estimate is a range."""
    entry = timings.measured(target.label, width, height, threads)
    if entry is None:
        return "no per-step time measured yet for this model and size on this machine (run with --profile)"
    per_step = entry["median_step_ms"] / 1000
    if full is not None and full[0] < steps:
        low, high = full
        if low == high:
            text = f"≈ {low} full steps of {steps} × {per_step:.2f} s/step = {low * per_step:.1f} s"
        else:
            text = f"≈ {low}-{high} full steps × {per_step:.2f} s/step = {low * per_step:.1f}-{high * per_step:.1f} s"
        steps = high
    else:
        text = f"≈ {policy.plural(steps)} × {per_step:.2f} s/step = {steps * per_step:.1f} s"
    around = {name: entry[name] / 1000 for name in timings.PARTS if name in entry}
    if around:  # load, prompt and decode as measured last time: the whole run, not the steps alone
        total = steps * per_step + sum(around.values())
        parts = ", ".join(f"{label} {around[name]:.1f} s" for name, label in (
            ("load_ms", "load"), ("text_encoder_ms", "prompt"), ("vae_encode_ms", "image"), ("vae_decode_ms", "decode"),
        ) if around.get(name))  # fmt: skip
        text += f"; with {parts}: ≈ {total:.1f} s in all"
    return text + " (measured on this machine)"


def print_plan(target: Target, steps, decision, guidance, width, height, seed, threads, start=None, cache=None) -> None:
    m = target.model
    where = f"{target.folder} ({target.weights})" if target.folder else "not exported"
    if target.random_weights:
        where += " — RANDOM weights (a tiny or benchmark build): the image will be noise-like"
    note = (
        "default" if decision.default else ("recommended" if decision.verdict == policy.OK else "outside recommended")
    )
    if m.cfg:
        gtext = f"{guidance} (classifier-free guidance)"
    elif m.guidance_embedded:
        gtext = f"{guidance} (embedded guidance)"
    else:
        gtext = "none (distilled without classifier-free guidance)"
    lo, hi = m.recommended_steps
    click.echo(f"Model:    {m.name} [{m.id}] — {where}")
    ranges = f"recommended {lo}-{hi}, max useful {m.max_useful_steps}"
    if start is None:
        click.echo(f"Steps:    {steps} ({note}; {ranges})")
    else:  # the policy judged the steps that run: the schedule's tail
        what = "inpainting" if start.mask is not None else "image-to-image"
        click.echo(f"Steps:    {decision.steps_run} run, the last of {steps} ({note}; {ranges})")
        click.echo(f"Image:    {what}, strength {start.strength:g} (the image's size unless --width/--height)")
    click.echo(f"Guidance: {gtext}")
    click.echo(f"Size:     {width}x{height}")
    click.echo(f"Seed:     {seed}")
    full = step_cache.full_evaluations(cache, decision.steps_run)
    if cache is not None:
        low, high = full
        run = decision.steps_run
        denoiser = "UNet" if target.family.denoiser == "unet" else "transformer"
        if low == high:
            plan = cache.resolved(run).schedule(run)
            which = ",".join(str(i + 1) for i, computed in enumerate(plan) if computed)
            text = f"{low} of the {run} steps run the whole {denoiser} (steps {which})"
        else:
            text = f"decided each step: {low} to {high} of the {run} steps run the whole {denoiser}"
        note = cache.ratios_note()
        click.echo(f"Cache:    {cache.label()} — {text}" + (f"; {note}" if note else ""))
    click.echo(f"Estimate: {_estimate(target, decision.steps_run, width, height, threads, full)}")


def _stage_label(target: Target, stage: int) -> str:
    """Where a cascade's later stage keeps its measured time per step (registry/timings.py)."""
    return f"{target.label}#stage-{stage}"


def print_stage_plan(stage, decision, target: Target, width, height, threads, number: int = 2) -> None:
    """A cascade's later stage's line (DeepFloyd IF's stage II, and III when exported): its own steps and
    guidance (it upscales the previous stage's image), and its estimate from its own measured time per step."""
    note = (
        "default" if decision.default else ("recommended" if decision.verdict == policy.OK else "outside recommended")
    )
    lo, hi = stage.recommended_steps
    what = "stage I's image (Size above)" if number == 2 else "stage II's image 4x (its VAE)"
    click.echo(
        f"Stage {'I' * number}: {decision.steps} steps ({note}; recommended {lo}-{hi}, "
        f"max useful {stage.max_useful_steps}), guidance {stage.guidance}; upscales {what}"
    )
    per_step = timings.step_seconds(_stage_label(target, number), width, height, threads)
    if per_step is not None:
        total = decision.steps * per_step
        click.echo(f"          ≈ {policy.plural(decision.steps)} × {per_step:.2f} s/step = {total:.1f} s (measured)")


def has_stage_3(target: Target) -> bool:
    """Whether the export is a cascade with a stage III (DeepFloyd IF exported with --stage-3)."""
    if target.folder is None or not target.model.stages:
        return False
    from registry import manifest as manifest_format

    try:
        stages = manifest_format.read(target.folder).config.get("stages") or []
    except Exception:  # noqa: BLE001 - an unreadable manifest is reported when the export is loaded
        return False
    return any(int(stage.get("stage", 0)) == 3 for stage in stages)


def not_exported_message(target: Target) -> str:
    m, fam = target.model, target.family
    if Path(m.id).is_dir():  # a folder named like the id is not the model: a path must say so
        return f"{m.name} is not exported; to use the folder ./{m.id} instead, pass --model ./{m.id}"
    if not fam.exportable:
        return (
            f"{m.name} ({fam.name} family) has no Stepwise engine yet: it cannot be exported or run; "
            f"pick another model (`stepwise models`)"
        )
    return (
        f"{m.name} is not exported yet: run `stepwise export {m.hub_id} --model {m.id}` on a machine that "
        f"reaches the Hugging Face hub (or `stepwise export tiny:{_tiny_name(m)} --model {m.id}` for a "
        f"tiny random-weight stand-in)"
    )


def _tiny_name(m: registry.Model) -> str:
    if m.id == "lcm":
        return "lcm"
    if m.family in ("flux", "hidream"):  # one tiny build per variant: tiny:flux-dev, tiny:hidream-i1-fast
        return m.id
    return m.family


# ---------------------------------------------------------------- interactive mode


def _ask(prompt: str) -> str:
    click.echo(prompt, nl=False)
    line = sys.stdin.readline()
    if not line:
        click.echo()
        _fail("no answer on standard input; run `stepwise generate PROMPT --model ID` to skip the questions", 2)
    if not sys.stdin.isatty():
        click.echo(line.strip())  # piped answers are not echoed by a terminal; show them so the transcript reads
    return line.strip()


def _menu_state(m: registry.Model) -> str:
    if not registry.family(m.family).exportable:
        return "no engine yet"
    return "exported" if registry.exported_path(m.id) else "not exported"


def ask_model() -> registry.Model:
    """The menu, as the steps guide shows it; Enter takes the default (SDXL Turbo, item 1). A model that is not
    exported or has no engine is said so now, before the prompt and steps are asked (the dialogue still shows
    its step policy and plan; generating then stops with what to run)."""
    models = registry.all_models()
    default = registry.get(DEMO_MODEL)
    click.echo("Models:")
    for m in models:
        click.echo(
            f"  [{m.menu:>2}] {m.name:<28} {policy.plural(m.default_steps):>9} "
            f"(recommended {policy.step_range(m)})  {_menu_state(m)}"
        )
    while True:
        answer = _ask(f"Select model [1-{len(models)}, Enter = {default.menu}]: ")
        model = registry.find(answer) if answer else default
        if model is None:
            click.echo(f"  '{answer}' is not on the list: type a number from 1 to {len(models)}")
            continue
        if _menu_state(model) != "exported":
            target = Target(model, registry.family(model.family), None, model.id)
            click.echo(f"  note: {not_exported_message(target)}")
        return model


def ask_prompt() -> str:
    while True:
        answer = _ask("Enter prompt: ")
        if answer:
            return answer
        click.echo("  the prompt is empty: say what to draw, e.g. a red apple")


def ask_steps(model: registry.Model, force: bool) -> int | None:
    """The step count typed at the prompt; None when Enter took the model's default."""
    while True:
        answer = _ask("Number of steps [default, or enter number]: ")
        if not answer:
            decision = policy.decide_steps(model, None)
            click.echo(f"  → {policy.plural(decision.steps)} (optimal for {model.name}) ✅")
            return None
        try:
            steps = int(answer)
            decision = policy.decide_steps(model, steps)
        except (ValueError, InputError):
            click.echo(f"  '{answer}' is not a step count: type a whole number ≥ 1, or press Enter for the default")
            continue
        if decision.verdict == policy.OK:
            click.echo(f"  → {steps} steps: good ✅")
            return steps
        too_many = steps > model.recommended_steps[1]
        label = "TOO MANY" if too_many else "TOO FEW"
        if decision.verdict == policy.WARN:
            click.echo(f"  → {steps} steps: {'more' if too_many else 'fewer'} than recommended ⚠ {decision.advice}")
            return steps
        click.echo(f"  → {steps} steps: {label} ❌ {decision.advice.split(' Use --steps')[0]}")
        if force:
            return steps
        click.echo(f"  Type another number, or press Enter for {policy.plural(model.default_steps)}.")


# ---------------------------------------------------------------- commands


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def main_group(ctx):
    """Stepwise: text-to-image on the CPU with ONNX Runtime, honest about what every step costs.

    Run with no command to be asked for a model, a prompt and a step count.
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(generate)


@main_group.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print the registry as a JSON list.")
def models_cmd(as_json):
    """List the models Stepwise knows, their step policies and whether they are exported here."""
    rows = []
    for m in registry.all_models():
        row = m.as_dict()
        folder = registry.exported_path(m.id)
        row["exportable"] = registry.family(m.family).exportable
        row["exported"] = str(folder) if folder else None
        row["random_weights"] = bool(folder) and Target(m, registry.family(m.family), folder, m.id).random_weights
        rows.append(row)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    header = (
        f"{'#':>2}  {'id':<15} {'family':<12} {'default':>7} {'recomm.':>8} {'min-max':>8}  {'guid.':>5}  "
        f"{'size':>9}  {'GB fp32/int8/int4':>17}  exported"
    )
    click.echo(header)
    click.echo("-" * len(header) + "-" * 20)
    for r in rows:
        lo, hi = r["recommended_steps"]
        guidance = f"{r['guidance']:g}" if (r["cfg"] or r["guidance_embedded"]) else "-"
        state = r["exported"] or ("no" if r["exportable"] else "no engine yet")
        if r["random_weights"]:
            state += " (RANDOM weights)"
        click.echo(
            f"{r['menu']:>2}  {r['id']:<15} {r['family']:<12} {r['default_steps']:>7} {f'{lo}-{hi}':>8} "
            f"{str(r['min_steps']) + '-' + str(r['max_useful_steps']):>8}  {guidance:>5}  "
            f"{str(r['width']) + 'x' + str(r['height']):>9}  {_memory_column(r['memory_mb']):>17}  {state}"
        )
    click.echo(
        "\nGB: the memory a generation needs at the default size with the phased policy (--low-memory), the "
        "denoiser in each weight format (export --weights) and T5-XXL / Qwen2.5-VL in the same, int8 at most "
        "(--text-encoder-weights); a cascade's largest stage, its optional stage III (--stage-3) included; "
        "'-': no such export."
    )
    click.echo(f"Exported models live in {registry.models_home()} (set STEPWISE_HOME to move them).")


def _memory_column(memory: dict) -> str:
    return "/".join("-" if memory[f] is None else f"{memory[f] / 1024:.0f}" for f in ("fp32", "int8", "int4"))


@main_group.command("export")
@click.argument("source", required=False)
@click.option("--model", "model_id", help="Registry id whose step policy the export carries (see `stepwise models`).")
@click.option("--out", type=click.Path(path_type=Path), help="Output folder (default: the models home / ID).")
@click.option("--unet", help="Replace the UNet with this checkpoint: FILE or REPO:FILE (SDXL Lightning).")
@click.option("--lora", help="Fuse this LoRA into the weights before export: FILE or REPO:FILE (LCM-LoRA).")
@click.option("--lora-scale", type=float, default=1.0, show_default=True)
@click.option("--no-optimum", is_flag=True, help="Export with torch.onnx only, even when optimum is installed.")
@click.option(
    "--weights",
    type=click.Choice(["fp32", "int8", "int8-static", "int4"]),
    default=None,
    help="Denoiser precision (default fp32; Qwen-Image int4): int8 = weight-only, Linear weights block-wise "
    "8-bit (MatMulNBits) and UNet convolution weights int8 per channel (~1/4 of the fp32 memory); int8-static = "
    "UNets only, static int8 convs calibrated on the model's own sampling + dynamic int8 MatMuls (~2x faster SD "
    "1.5 steps; loads the whole pipeline to calibrate: SD 1.5 ~17 GB); int4 = 4-bit Linear weights, UNet "
    "convolutions fp32. Folder and hub checkpoints are exported tensor by tensor (never loaded whole), except "
    "with int8-static or a UNet model's --vae-weights int8.",
)
@click.option(
    "--vae-weights",
    type=click.Choice(["fp32", "int8"]),
    default="fp32",
    show_default=True,
    help="VAE decoder precision: int8 = static int8 convs (~0.35-0.5x the decode time; its image 27-37 dB from "
    "the fp32 decoder's on random weights), "
    "calibrated on a UNet model's own samples (loads the whole pipeline in fp32) or, for SD 3, SD 3.5, FLUX and "
    "HiDream, on the VAE encoder's latents of synthetic images (streamed export; the calibration raises its peak to "
    "~6.5 GB). Not Qwen-Image.",
)
@click.option(
    "--text-encoder-weights",
    type=click.Choice(["fp32", "int8", "int4"]),
    default=None,
    help="The big text encoder's precision (default fp32; Qwen-Image int4): T5-XXL (SD 3, FLUX), Qwen2.5-VL "
    "(Qwen-Image): int8/int4 = block-wise MatMulNBits weights (T5-XXL 9.5 GB fp32 → 5 / 2.7 GB).",
)
@click.option("--no-fuse", is_flag=True, help="Keep the UNet's attention as exported (no CPU flash-attention rewrite).")
@click.option("--stage-2", "stage_2", help="A cascade's stage II, folder or hub repo (DeepFloyd IF: IF-II).")
@click.option(
    "--stage-3",
    "stage_3",
    is_flag=False,
    flag_value="",
    help="A cascade's stage III, folder or hub repo (DeepFloyd IF: the SD x4 upscaler); alone, with --model, the "
    "registry's (stabilityai/stable-diffusion-x4-upscaler), with tiny:deepfloyd-if its tiny one.",
)
@click.option(
    "--cache-graphs",
    is_flag=True,
    help="Also write the denoiser as the graphs step caching runs (generate --cache; FLUX, SD 3, SD 1.5, SDXL): "
    "its weights a second time on disk.",
)
def export_cmd(
    source,
    model_id,
    out,
    unet,
    lora,
    lora_scale,
    no_optimum,
    weights,
    vae_weights,
    text_encoder_weights,
    no_fuse,
    stage_2,
    stage_3,
    cache_graphs,
):
    """Convert a diffusers checkpoint (hub id, folder or tiny:<family>) to ONNX, once.

    With --model and no SOURCE, the registry's checkpoint (and its parts, e.g. SDXL Lightning's UNet) is used.
    """
    if model_id is not None and registry.find(model_id) is None:
        _fail(f"unknown model {model_id!r}; see `stepwise models` for the ids", 2)
    if model_id is not None:
        fam = registry.family(registry.get(model_id).family)
        if not fam.exportable:  # said before anything is downloaded or imported
            name = registry.get(model_id).name
            _fail(f"{name} has no Stepwise engine yet: it cannot be exported; see `stepwise models`", 2)
    if source is None:
        if model_id is None:
            _fail("say what to export: a hub repo id, a diffusers folder, tiny:<family>, or --model ID", 2)
        source = registry.get(model_id).hub_id
    _require_export_extra()
    import exporters

    try:
        folder = exporters.export(
            source,
            out=out,
            model_id=model_id,
            unet=unet,
            lora=lora,
            lora_scale=lora_scale,
            use_optimum=False if no_optimum else None,
            weights=weights,
            vae_weights=vae_weights,
            text_encoder_weights=text_encoder_weights,
            fuse=not no_fuse,
            stage_2=stage_2,
            stage_3=stage_3,
            cache_graphs=cache_graphs,
            progress=lambda line: click.echo(line, err=True),
        )
    except exporters.ExportError as exc:
        _fail(str(exc), 2)
    click.echo(f"exported to {folder}")


EXPORT_PACKAGES = ("torch", "diffusers", "transformers", "onnx")


def _require_export_extra(what: str = "exporting") -> None:
    """The runtime install has no torch: say which extra to install instead of a ModuleNotFoundError."""
    import importlib.util

    missing = [name for name in EXPORT_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        _fail(f"{what} needs the export extra ({', '.join(missing)} missing): pip install -e '.[export]'", 2)


def _run_generation(
    target: Target,
    *,
    prompt,
    negative,
    steps,
    guidance,
    width,
    height,
    seed,
    threads,
    out,
    latents_file,
    scheduler,
    skip,
    start,
    low_memory,
    profile,
    profile_json,
    vae_tiling=False,
    steps_2=None,
    steps_3=None,
    cache=None,
):
    import engine

    latents = _read_latents(latents_file) if latents_file is not None else None
    if sys.stderr.isatty():  # the progress display starts at once: loading a big model takes a while
        click.echo("  loading the model …", err=True, nl=False)
    try:
        tiling = True if vae_tiling else None  # None: tiles when the plan needs them
        pipe = engine.load_pipeline(
            target.folder,
            threads=threads,
            skip=skip,
            policy=engine.PHASED if low_memory else None,
            width=width,
            height=height,
            guidance=guidance,
            image=start is not None,
            vae_tiling=tiling,
            cache=cache,
        )
        if sys.stderr.isatty():
            click.echo("\r\033[K", err=True, nl=False)
        click.echo(f"Memory:   {pipe.memory.describe()}")
        cascade = {k: v for k, v in (("steps_2", steps_2), ("steps_3", steps_3)) if v is not None}
        result = pipe.generate(
            **cascade,
            prompt=prompt,
            negative_prompt=negative,
            steps=steps,
            guidance=guidance,
            width=width,
            height=height,
            seed=seed,
            latents=latents,
            scheduler=scheduler,
            image=start.image if start else None,
            mask=start.mask if start else None,
            strength=start.strength if start else None,
            show_progress=sys.stderr.isatty(),
            vae_tiling=tiling,
            cache=cache,
        )
    except (engine.EngineError, InputError, ManifestError) as exc:
        _fail(str(exc), 2)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    extra = {"weights": "random"} if target.random_weights else None
    try:
        path = engine.save_png(result, out, extra)
    except OSError as exc:  # checked before loading; a disk that filled meanwhile still loses nothing
        _fail(f"--out {out}: the image could not be written ({exc.strerror or exc}); free space or write elsewhere")
    click.echo(f"saved {path}")
    if result.parameters.get("cache_mag_ratios"):  # --cache magcache:calibrate=true measured them
        ratios = result.parameters["cache_mag_ratios"]
        click.echo(f'MagCache calibration: reuse these ratios with --cache "magcache:mag_ratios={ratios}"')
    prof = result.profile
    try:
        stages = prof.get("stages") or []
        # a cascade: each stage's own time per step (the plan estimates each), stage I's under the model's label
        # a full evaluation's time: with a step cache, the median of the steps computed in full
        main_ms = stages[0]["median_step_ms"] if stages else prof["median_full_step_ms"]
        timings.record(target.label, width, height, threads, main_ms, prof)
        for stage in stages[1:]:
            timings.record(_stage_label(target, stage["stage"]), width, height, threads, stage["median_step_ms"])
    except OSError as exc:  # the image is saved: a timings file that cannot be written is not a failure
        click.echo(
            f"warning: the step time was not recorded in {timings.timings_path()} ({exc.strerror or exc})", err=True
        )
    if profile:
        click.echo(engine.format_profile(prof))
    if profile_json:
        try:
            atomic_write_text(profile_json, json.dumps(prof, indent=2) + "\n")
        except OSError as exc:
            _fail(f"--profile-json {profile_json}: not written ({exc.strerror or exc}); the image was saved to {path}")
        click.echo(f"profile written to {profile_json}")


def _read_latents(latents_file):
    """A .npy array of finite numbers (never a pickle), or a one-line error."""
    import numpy as np

    try:
        latents = np.load(latents_file, allow_pickle=False)
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:120]
        _fail(f"--latents {latents_file}: not a .npy array ({reason}); save it with numpy.save", 2)
    if not isinstance(latents, np.ndarray) or not np.issubdtype(latents.dtype, np.number):
        _fail(f"--latents {latents_file}: not a single numeric .npy array (an .npz?); save one with numpy.save", 2)
    if not np.isfinite(latents).all():
        _fail(f"--latents {latents_file} holds NaN or infinite values; save standard-normal noise", 2)
    return latents


@main_group.command("generate")
@click.argument("prompt", required=False)
@click.option("--model", "model_spec", help="Registry id, menu number or exported folder [default: sdxl-turbo].")
@click.option("--steps", type=int, help="Denoising steps [default: the model's].")
@click.option("--steps-2", "steps_2", type=int, help="DeepFloyd IF: stage II's steps [default: its own, 50].")
@click.option(
    "--steps-3",
    "steps_3",
    type=int,
    help="DeepFloyd IF exported with --stage-3: the x4 upscaler's steps [default: 75].",
)
@click.option("--guidance", type=float, help="Guidance scale [default: the model's].")
@click.option("--seed", type=int, help="Random seed [default: random, printed].")
@click.option("--width", type=int)
@click.option("--height", type=int)
@click.option("--negative", default="", help="Negative prompt (models with classifier-free guidance).")
@click.option("--out", type=click.Path(path_type=Path), help="PNG to write [default: stepwise-ID-SEED.png].")
@click.option("--force", is_flag=True, help="Run a step count the model's policy refuses.")
@click.option("--threads", type=int, help="ONNX Runtime threads [default: physical cores].")
@click.option(
    "--latents",
    "latents_file",
    type=click.Path(path_type=Path),
    help="Initial noise from a .npy file of shape (1, C, H/8, W/8) instead of the seed.",
)
@click.option("--scheduler", help="Swap the sampler, by diffusers class name (e.g. DPMSolverMultistepScheduler).")
@click.option("--no-t5", is_flag=True, help="SD3: run without the T5 encoder (zeros in its place) to save memory.")
@click.option(
    "--image",
    "image_file",
    type=click.Path(path_type=Path),
    help="Image-to-image: start from this picture (the output takes its size unless --width/--height).",
)
@click.option("--mask", "mask_file", type=click.Path(path_type=Path), help="Inpainting: white is repainted.")
@click.option(
    "--strength",
    type=float,
    help="With --image: how much is repainted, in (0, 1]; int(steps x strength) steps run [default: the pipeline's].",
)
@click.option(
    "--low-memory",
    is_flag=True,
    help="Load one phase at a time (text encoders, denoiser, decoder), releasing each before the next.",
)
@click.option(
    "--vae-tiling",
    is_flag=True,
    help="Decode (and encode) the image in overlapping tiles, as diffusers' vae.enable_tiling() [default: when it "
    "would not fit otherwise].",
)
@click.option(
    "--cache",
    "cache",
    metavar="MODE[:KEY=VALUE,...]",
    help="Step caching: skip most of the denoiser on some steps, as the reference hook does (fbcache, magcache, "
    "taylorseer (default or use_lite_mode=true) on FLUX, SD 3 and Qwen-Image; magcache on SD 3 "
    "with mag_ratios=[...]/flux or calibrate=true; deepcache on SD 1.5/SDXL; README, 'Step caching'). Not for "
    "few-step models.",
)
@click.option("--profile", is_flag=True, help="Print a per-step latency table after the image is saved.")
@click.option("--profile-json", type=click.Path(path_type=Path), help="Write the profile as JSON to this file.")
def generate(
    prompt,
    model_spec,
    steps,
    steps_2,
    steps_3,
    guidance,
    seed,
    width,
    height,
    negative,
    out,
    force,
    threads,
    latents_file,
    scheduler,
    no_t5,
    image_file,
    mask_file,
    strength,
    low_memory,
    vae_tiling,
    cache,
    profile,
    profile_json,
):
    """Generate an image. With no PROMPT, asks for model, prompt and steps as the steps guide shows.

    With --image: image-to-image; with --mask too: inpainting (white is repainted)."""
    interactive = prompt is None
    if interactive:
        if model_spec is None:
            model_spec = ask_model().id
        target = resolve_model(model_spec)
        prompt = ask_prompt()
        if steps is None:
            steps = ask_steps(target.model, force)
    else:
        target = resolve_model(model_spec or DEMO_MODEL)
    m = target.model
    start = _start_image(target, image_file, mask_file, strength, width, height)
    try:  # the checks `stepwise serve` makes too: registry/requests.py
        plan = requests.plan_request(
            m,
            target.family,
            prompt=prompt,
            steps=steps,
            guidance=guidance,
            width=width,
            height=height,
            seed=seed,
            force=force,
            native=target.native_size,
            image_size=start.image.size if start else None,
            inpaint=start is not None and start.mask is not None,
            strength=start.strength if start else None,
            threads=threads,
            steps_2=steps_2,
            steps_3=steps_3,
            stage_3=has_stage_3(target),
            cache=cache,
        )
    except InputError as exc:  # requests.Refused included: "refused: …" with the policy's advice
        _fail(str(exc), 2)
    decision, guidance, width, height, seed = plan.decision, plan.guidance, plan.width, plan.height, plan.seed
    prompt = plan.prompt
    cores = os.cpu_count() or 1
    if threads is not None and threads > cores:
        click.echo(
            f"warning: --threads {threads} is more than this machine's {cores} logical cores; using {cores}", err=True
        )
        threads = cores
    if plan.warning and not interactive:
        click.echo(f"warning: {plan.warning}", err=True)
    print_plan(target, decision.steps, decision, guidance, width, height, seed, threads, start, plan.cache)
    if plan.decision_2 is not None:
        print_stage_plan(m.stage(2), plan.decision_2, target, width, height, threads)
    if plan.decision_3 is not None:
        print_stage_plan(m.stage(3), plan.decision_3, target, width, height, threads, number=3)
    if target.folder is None:
        _fail(not_exported_message(target), 1)
    out = out or Path(f"stepwise-{m.id}-{seed}.png")
    try:  # checked before loading: nothing is computed for a result that cannot be saved
        check_output(out, option="--out", suffixes=(".png",), need_bytes=width * height * 3 + 2**16)
        if profile_json is not None:
            check_output(profile_json, option="--profile-json", suffixes=(".json",), need_bytes=2**16)
    except OutputError as exc:
        _fail(str(exc), 2)
    _run_generation(
        target,
        prompt=prompt,
        negative=negative,
        steps=decision.steps,
        guidance=guidance,
        width=width,
        height=height,
        seed=seed,
        threads=threads,
        out=out,
        latents_file=latents_file,
        scheduler=scheduler,
        skip=("text_encoder_3",) if no_t5 else (),
        start=start,
        low_memory=low_memory,
        profile=profile,
        profile_json=profile_json,
        vae_tiling=vae_tiling,
        steps_2=plan.stage_steps.get("steps_2"),
        steps_3=plan.stage_steps.get("steps_3"),
        cache=plan.cache,
    )


@dataclass
class StartImage:
    """--image/--mask/--strength as read and checked before anything is loaded."""

    image: object  # PIL.Image
    mask: object | None
    strength: float  # the family's diffusers default when not given
    size: tuple[int, int]  # the image's size, rounded down to the family's size multiple


def _start_image(target: Target, image_file, mask_file, strength, width, height) -> StartImage | None:
    if image_file is None:
        if mask_file is not None:
            _fail("--mask needs --image: the mask says which part of an image to repaint", 2)
        if strength is not None:
            _fail("--strength needs --image: it says how much of the image to repaint", 2)
        return None
    try:
        requests.check_strength(strength)
    except InputError as exc:
        _fail(str(exc), 2)
    from engine.errors import EngineError
    from engine.images import load_image

    try:
        image = load_image(image_file)
        mask = load_image(mask_file) if mask_file is not None else None
    except EngineError as exc:
        _fail(str(exc), 2)
    if mask is not None and mask.size != image.size:
        _fail(
            f"--mask is {mask.size[0]}x{mask.size[1]} but --image is {image.size[0]}x{image.size[1]}; "
            f"give a mask of the image's size",
            2,
        )
    strength = requests.start_strength(target.family, strength, inpaint=mask is not None)
    return StartImage(image, mask, strength, requests.start_size(target.family, image.size))


SERVE_PACKAGES = ("fastapi", "uvicorn", "multipart")


@main_group.command("serve")
@click.option(
    "--model",
    "model_specs",
    multiple=True,
    help="Registry id or exported folder to serve; repeat for several [default: sdxl-turbo].",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback: this machine).")
@click.option("--port", type=int, default=7860, show_default=True)
@click.option("--threads", type=int, help="ONNX Runtime threads per model [default: physical cores].")
@click.option(
    "--out-dir",
    type=click.Path(path_type=Path),
    help="Where images asked for by URL or with save_images are written [default: $STEPWISE_HOME/outputs].",
)
@click.option("--low-memory", is_flag=True, help="Load one phase at a time instead of keeping every session loaded.")
@click.option(
    "--ray",
    "ray_address",
    help="Serve as Ray Serve replicas on this cluster (auto: join or start one; or ADDRESS); needs the ray extra.",
)
@click.option("--replicas", type=int, default=1, show_default=True, help="With --ray: replicas, each with its models.")
@click.option(
    "--steps-2", "steps_2", type=int, help="DeepFloyd IF: stage II's steps for every request [default: its own, 50]."
)
@click.option(
    "--steps-3",
    "steps_3",
    type=int,
    help="DeepFloyd IF exported with --stage-3: the x4 upscaler's steps for every request [default: 75].",
)
def serve_cmd(model_specs, host, port, threads, out_dir, low_memory, ray_address, replicas, steps_2, steps_3):
    """Keep models loaded and serve AUTOMATIC1111's (/sdapi/v1) and OpenAI's (/v1/images) image APIs.

    Requests for a model run one at a time, in order, each through the same step policy as `generate`
    (--steps-2/--steps-3 included: a count the policy refuses is refused unless the request says force)."""
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        missing = exc.name or ", ".join(SERVE_PACKAGES)
        _fail(f"serve needs the serve extra ({missing} missing): pip install -e '.[serve]'", 2)
    if threads is not None and threads < 1:
        _fail(f"--threads must be at least 1 (got {threads})", 2)
    if not 0 < port < 65536:
        _fail(f"--port must be between 1 and 65535 (got {port})", 2)
    import socket

    try:  # before loading: a big model takes a while to load, for nothing if the port is taken
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        _fail(f"cannot listen on {host}:{port} ({reason}); choose another --port or --host", 2)
    from serve.app import create_app
    from serve.server import run
    from serve.worker import ModelError

    specs = list(model_specs) or [DEMO_MODEL]
    if ray_address is not None:
        stage_steps = {"steps_2": steps_2, "steps_3": steps_3}
        _serve_on_ray(create_app, specs, replicas, threads, host, port, ray_address, out_dir, low_memory, stage_steps)
        return
    click.echo(f"loading {', '.join(specs)} …")
    try:
        app = create_app(
            specs, threads=threads, out_dir=out_dir, low_memory=low_memory, steps_2=steps_2, steps_3=steps_3
        )
    except ModelError as exc:
        _fail(str(exc), 2)
    for worker in app.state.stepwise.workers.values():
        click.echo(f"  {worker.id}: {worker.target.folder} — {worker.pipeline.memory.describe()}")
    click.echo(
        f"serving on http://{host}:{port}  (AUTOMATIC1111: /sdapi/v1/txt2img, OpenAI: /v1/images/generations); "
        f"Ctrl-C stops"
    )
    run(app, host=host, port=port)
    click.echo("server stopped")


def _serve_on_ray(create_app, specs, replicas, threads, host, port, address, out_dir, low_memory, stage_steps) -> None:
    """The same app as ``replicas`` Ray Serve replicas, each loading its own models (serve/ray_deploy.py)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        _fail("serve --ray needs the ray extra: pip install -e '.[ray]'", 2)
    if replicas < 1:
        _fail(f"--replicas must be at least 1 (got {replicas})", 2)
    from serve.ray_deploy import deploy

    click.echo(f"deploying {replicas} replica(s) of {', '.join(specs)} on Ray ({address}) …")
    try:
        deploy(
            create_app,
            specs,
            replicas,
            threads or 1,
            host=host,
            port=port,
            address=address,
            blocking=True,
            out_dir=out_dir,
            low_memory=low_memory,
            **stage_steps,
        )
    except (InputError, ValueError) as exc:  # a cluster that cannot be joined, a bad --replicas
        _fail(str(exc), 2)
    click.echo("server stopped")


@main_group.command("batch")
@click.argument("prompts", type=click.Path(path_type=Path))
@click.option("--model", "model_spec", required=True, help="Registry id, menu number or exported folder.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the images and results.jsonl.")
@click.option("--threads", type=int, help="ONNX Runtime threads per worker [default: 1, or cores / --workers].")
@click.option(
    "--workers", "--actors", "workers", type=int, help="Processes (or Ray actors) [default: cores / threads]."
)
@click.option("--ray", "ray_address", metavar="auto|ADDRESS", help="Run on Ray: auto, or a cluster's address.")
@click.option("--force", is_flag=True, help="Run step counts the model's policy refuses.")
def batch_cmd(prompts, model_spec, out, threads, workers, ray_address, force):
    """Generate every line of PROMPTS.jsonl ({"prompt": …, "seed": …, "steps": …, "size": "WxH", "negative": …})
    into --out, one PNG per line plus results.jsonl; a rerun skips what is finished."""
    import batch

    target = resolve_model(model_spec)
    if target.folder is None:
        _fail(not_exported_message(target), 1)
    try:
        summary = batch.run_batch(target, prompts, out, threads=threads, workers=workers, ray=ray_address, force=force)
    except InputError as exc:
        _fail(str(exc), 2)
    except batch.BatchStopped as exc:
        _fail(str(exc), 1)
    if summary.failures:
        job, error = summary.failures[0]
        more = f" (and {len(summary.failures) - 1} more)" if len(summary.failures) > 1 else ""
        _fail(f"{len(summary.failures)} of {summary.total} failed, line {job.line}: {error}{more}; rerun to retry them")


@main_group.command("verify")
@click.argument("model_spec", metavar="MODEL")
def verify_cmd(model_spec):
    """Check every graph and weight file of an export against the sha256 its manifest recorded."""
    from registry import manifest
    from registry.verify import recorded_files, verify

    target = resolve_model(model_spec)
    if target.folder is None:
        _fail(not_exported_message(target), 1)
    try:
        found = manifest.read(target.folder)
        hashed = verify(found, force=True, progress=lambda line: click.echo(f"  {line}", err=True))
    except ManifestError as exc:
        _fail(str(exc), 1)
    unhashed = len(recorded_files(found)) - len(hashed)
    note = f" ({unhashed} without a recorded hash: size checked only)" if unhashed else ""
    click.echo(f"{target.folder}: {len(hashed)} files match their recorded sha256{note}")


@main_group.command("demo")
@click.option("--out", type=click.Path(path_type=Path), default=Path("stepwise-demo.png"), show_default=True)
def demo(out):
    """Build a tiny random-weight SDXL-architecture model if none is exported, then generate and profile.

    The weights are random: the picture is noise-like. It shows the whole path (export, text encoding,
    the step loop, VAE, PNG, profile) in under a minute on a fresh clone.
    """
    ctx = click.get_current_context()
    folder = registry.models_home() / DEMO_FOLDER
    if not (folder / registry.MANIFEST).is_file():
        _require_export_extra("the demo builds its model, which")
        click.echo(
            f"no demo model yet: building a tiny random-weight SDXL Turbo stand-in ({DEMO_SOURCE}) in {folder} …"
        )
        ctx.invoke(export_cmd, source=DEMO_SOURCE, model_id=DEMO_MODEL, out=folder)
    ctx.invoke(
        generate, prompt="a red apple", model_spec=str(folder), seed=0, width=128, height=128, out=out, profile=True
    )
    click.echo("(random weights: the image shows the pipeline works, not what a real model draws)")


def _register_bench() -> None:
    """`stepwise bench` lives in bench/ (a benchmark, not the product); it needs the export extra."""
    try:
        from bench.cli import bench_cmd
    except ImportError as exc:
        missing = exc.name

        @main_group.command("bench", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
        def bench_unavailable():
            """Time the engine against PyTorch and OpenVINO (needs the bench extra)."""
            _fail(f"bench needs the bench extra ({missing} is missing): pip install -e '.[bench]'", 2)

        return
    main_group.add_command(bench_cmd)


_register_bench()


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM cleans up as Ctrl-C does: temporary folders go, nothing half-written stays


def main(argv=None):
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main_group.main(args=argv, prog_name="stepwise", standalone_mode=False)
    except Failure as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.code)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)  # Ctrl-C or SIGTERM (click turns KeyboardInterrupt into Abort)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
