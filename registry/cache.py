"""Step caching: ``--cache MODE[:key=value,...]`` parsed, checked and judged before anything is loaded.

A mode reuses work from earlier steps instead of running the whole denoiser every step, exactly as its
reference implementation does (the keys are the reference config's own field names, with its defaults).
The numbers are the engine's (engine/cache.py); this module knows the modes' names, fields, families and
which steps they compute, so the CLI, the server and batch refuse the same requests with the same one-line
reasons and the plan can say how many steps run the whole denoiser.

- ``fbcache``: diffusers 0.39's First Block Cache; decides each step from the first block's residual, so
  the plan gives a range.
- Qwen-Image (fbcache, magcache, taylorseer in either mode): its pipeline runs true CFG as two transformer
  calls in the cache contexts "cond" and "uncond", and the hooks keep one state per context; so does the engine
  (one cache per call of a step, engine/cache.py PerContext), each counting its own steps, so the schedules
  here hold per context. HiDream: every transformer mode is refused with what diffusers lacks there
  (HIDREAM_NO_REFERENCE).
- ``magcache``: diffusers 0.39's MagCache; a fixed schedule from magnitude ratios. FLUX's are MagCache's
  published calibration (diffusers' FLUX_MAG_RATIOS), Qwen-Image's the one in MagCache's repository
  (MagCache4QwenImage, named ``qwen-image``); for SD 3 none is published (MagCache's repository
  calibrates FLUX, Qwen-Image, Wan, HunyuanVideo and others, not SD 3), so SD 3 takes ``mag_ratios=[...]`` or
  ``mag_ratios=flux`` explicitly, as diffusers' MagCacheConfig does, and ``calibrate=true`` measures them
  on the user's model as diffusers' calibration does (every step computed, the ratios reported).
- ``deepcache``: the deepcache package's DeepCacheSDHelper, branch 0, for the UNets; a fixed schedule (every
  ``cache_interval``-th timestep index from the first, as the helper counts them: a scheduler that repeats a
  timestep, PNDM's second, repeats its index too, so the engine's count can differ by one from the plan's).
- ``taylorseer``: diffusers 0.39's TaylorSeer; a fixed schedule. Its default mode predicts every block's
  attention output on a predicted step and runs the rest of the transformer on it (the record and predict
  graphs of ``--cache-graphs``); ``use_lite_mode=true`` predicts the transformer's output and runs nothing
  (the whole graph); both on FLUX, SD 3 and Qwen-Image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from .policy import InputError

# the transformer's graphs fbcache and magcache run (exporters/split.py writes them), in the order they run
SPLIT_GRAPHS = ("transformer_first_block", "transformer_blocks", "transformer_out")
# what the first graph hands the remaining blocks beside the hidden states (FLUX's rotary embedding; SD 3 has none)
SPLIT_SHARED = ("temb", "rotary_cos", "rotary_sin")


def blocks_feeds(first: dict, hidden, feeds: dict) -> dict:
    """The remaining blocks' graph inputs: ``hidden``, the first graph's encoder states and SPLIT_SHARED outputs,
    and the whole graph's rotary tables (Qwen-Image's ``*_freqs_*`` inputs, which the blocks graph takes under
    their names). The engine's caches and the export's composition check feed the split with these."""
    shared = {name: first[name] for name in SPLIT_SHARED if name in first}
    tables = {name: value for name, value in feeds.items() if "_freqs_" in name}
    return {
        "hidden_states": hidden,
        "encoder_hidden_states": first["first_block_encoder_hidden_states"],
        **shared,
        **tables,
    }


def out_feeds(first: dict, hidden, feeds: dict) -> dict:
    """The output layers' graph inputs: the blocks' hidden states, the first graph's temb and (SD 3, which
    unpatchifies) the whole graph's latent, for its size; FLUX's output layers take no ``sample`` (not fed)."""
    return {"hidden_states": hidden, "temb": first["temb"], "sample": feeds["hidden_states"]}


# the transformer's graphs TaylorSeer's default mode runs (exporters/split.py): the whole one recording every
# hooked attention module's outputs (computed calls), and the one taking them as inputs (predicted calls)
TAYLOR_GRAPHS = ("transformer_taylor_record", "transformer_taylor_predict")
# the UNet's graphs deepcache runs (exporters/split.py): the deep part and the shallow branch
DEEPCACHE_GRAPHS = ("unet_deep", "unet_shallow")

# diffusers.hooks.mag_cache.FLUX_MAG_RATIOS (0.39): MagCache's published calibration for FLUX.1-dev, 28 steps
FLUX_MAG_RATIOS = (
    1.0, 1.21094, 1.11719, 1.07812, 1.0625, 1.03906, 1.03125, 1.03906, 1.02344, 1.03125, 1.02344, 0.98047,
    1.01562, 1.00781, 1.0, 1.00781, 1.0, 1.00781, 1.0, 1.0, 0.99609, 0.99609, 0.98047, 0.98828, 0.96484,
    0.95703, 0.93359, 0.89062,
)  # fmt: skip

# MagCache's published calibration for Qwen-Image (50 steps, true CFG), verbatim from the authors' repository:
# Zehong-Ma/MagCache, MagCache4QwenImage/magcache_generate.py (commit 566c3a16), ``mag_ratios = [...]``. Their
# forward counts both CFG calls, so the list interleaves the prompt's and the negative's ratio of each step
# after the first (the two are equal at every step) and their code puts [1.0, 1.0] in front
QWEN_IMAGE_MAG_RATIOS_INTERLEAVED = (
    1.64062, 1.64062, 1.45312, 1.45312, 1.1875, 1.1875, 1.17188, 1.17188, 1.05469, 1.05469, 1.21094, 1.21094,
    1.10938, 1.10938, 1.11719, 1.11719, 1.13281, 1.13281, 1.11719, 1.11719, 1.07812, 1.07812, 1.07031, 1.07031,
    1.08594, 1.08594, 1.08594, 1.08594, 1.07812, 1.07812, 1.03906, 1.03906, 1.04688, 1.04688, 1.07812, 1.07812,
    1.07031, 1.07031, 1.03125, 1.03125, 1.07812, 1.07812, 1.04688, 1.04688, 1.04688, 1.04688, 1.04688, 1.04688,
    1.03906, 1.03906, 1.01562, 1.01562, 1.03125, 1.03125, 1.02344, 1.02344, 1.02344, 1.02344, 1.02344, 1.02344,
    1.03906, 1.03906, 1.0, 1.0, 1.01562, 1.01562, 1.0, 1.0, 0.99219, 0.99219, 1.00781, 1.00781, 0.98047, 0.98047,
    0.95703, 0.95703, 0.96875, 0.96875, 0.99219, 0.99219, 0.92578, 0.92578, 0.92578, 0.92578, 0.90625, 0.90625,
    0.85938, 0.85938, 0.80469, 0.80469, 0.87891, 0.87891, 0.75, 0.75, 0.60938, 0.60938, 0.55078, 0.55078,
)  # fmt: skip
# as diffusers' MagCacheConfig takes ratios (one per step, each CFG context counting its own steps): the first
# step's 1.0, then the ratio of each later step
QWEN_IMAGE_MAG_RATIOS = (1.0, *QWEN_IMAGE_MAG_RATIOS_INTERLEAVED[0::2])

# the magnitude ratios MagCache's authors published, per family: name, ratios, what the plan says (diffusers 0.39
# ships FLUX's only; the MagCache repository, Zehong-Ma/MagCache, and its ComfyUI nodes have none for SD 3 / 3.5)
PUBLISHED_MAG_RATIOS = {
    "flux": ("flux", FLUX_MAG_RATIOS),
    "qwen-image": ("qwen-image", QWEN_IMAGE_MAG_RATIOS),
}
NAMED_MAG_RATIOS = {name: ratios for name, ratios in PUBLISHED_MAG_RATIOS.values()}
MAG_RATIOS_NOTES = {
    "flux": "FLUX.1-dev's (MagCache's published calibration, diffusers' FLUX_MAG_RATIOS)",
    "qwen-image": "Qwen-Image's (MagCache's published calibration, 50 steps, MagCache4QwenImage)",
}

# SD 3: diffusers 0.39 runs these hooks on SD3Transformer2DModel only with a cache context set (its pipeline
# sets none) and, for First Block Cache and TaylorSeer, with the last block returning its (discarded) encoder
# states rather than None; the parity tests reproduce diffusers' hooks on SD 3 so (test_engine_parity_flow.py)


# where TaylorSeer's default mode (every block's attention output predicted) is not offered, and why
TAYLORSEER_NOT_BUILT = {
    "hidream": "diffusers 0.39's TaylorSeer hooks the attention modules of blocks listed as transformer_blocks, "
    "single_transformer_blocks or blocks, and HiDream's are double_stream_blocks and single_stream_blocks: it "
    "hooks nothing, so there is no reference to reproduce",
}


@dataclass(frozen=True)
class Mode:
    name: str
    reference: str  # the implementation whose decisions and outputs the engine reproduces
    fields: dict  # field → default (the reference config's); the default's type is the field's type
    families: tuple[str, ...]  # where the engine runs it
    graphs: str  # "split" / "taylor" / "deepcache": exporters/split.py's graphs; "whole": the plain denoiser graph
    why_not: dict = field(default_factory=dict)  # family → why the mode is not offered there
    optional_ints: tuple[str, ...] = ()  # fields whose default is None and whose value is a whole number
    label_computed: str = "computed"
    label_skipped: str = "cached"
    # (field, value) → what differs for a run with that value (TaylorSeer's lite mode runs the whole graph)
    when: dict = field(default_factory=dict)

    def given(self, options: dict) -> Mode:
        """The mode as a run with ``options`` has it (its graphs, where it runs)."""
        changes = {
            k: v for (key, value), change in self.when.items() if options.get(key) == value for k, v in change.items()
        }
        return replace(self, **changes) if changes else self


MODES = {
    m.name: m
    for m in (
        Mode(
            name="fbcache",
            reference="diffusers 0.39 FirstBlockCacheConfig / apply_first_block_cache",
            fields={"threshold": 0.05},
            families=("flux", "sd3", "qwen-image"),
            graphs="split",
        ),
        Mode(
            name="magcache",
            reference="diffusers 0.39 MagCacheConfig / apply_mag_cache",
            # num_inference_steps: None = the run's steps (the reference asks the caller to set it so);
            # mag_ratios: None = the family's published ones (FLUX's), else "flux" or a tuple of numbers
            fields={
                "threshold": 0.06,
                "max_skip_steps": 3,
                "retention_ratio": 0.2,
                "num_inference_steps": None,
                "mag_ratios": None,
                "calibrate": False,
            },
            families=("flux", "sd3", "qwen-image"),
            graphs="split",
            optional_ints=("num_inference_steps",),
        ),
        Mode(
            name="taylorseer",
            reference="diffusers 0.39 TaylorSeerCacheConfig / apply_taylorseer_cache",
            fields={
                "cache_interval": 5,
                "disable_cache_before_step": 3,
                "disable_cache_after_step": None,
                "max_order": 1,
                "use_lite_mode": False,
            },
            families=("flux", "sd3", "qwen-image"),
            graphs="taylor",
            optional_ints=("disable_cache_after_step",),
            label_skipped="predicted",
            when={
                ("use_lite_mode", True): {"graphs": "whole"},
                ("use_lite_mode", False): {"why_not": TAYLORSEER_NOT_BUILT},
            },
        ),
    )
}
MODES["deepcache"] = Mode(
    name="deepcache",
    reference="the deepcache package's DeepCacheSDHelper.set_params (skip_mode uniform)",
    fields={"cache_interval": 1, "cache_branch_id": 0},
    families=("sd15", "sdxl"),
    graphs="deepcache",
)
# why each transformer mode is refused for HiDream (checked on a tiny HiDreamImageTransformer2DModel with
# diffusers 0.39, tests/test_step_cache.py): it is no CacheMixin (no enable_cache), HiDreamImagePipeline sets no
# cache context, its blocks lists (double_stream_blocks, single_stream_blocks) are not among the names the hooks
# look for (hooks/_common.py) nor its blocks in TransformerBlockRegistry, and it has no proj_out (final_layer);
# kept apart from the table above, added to each mode's why_not
HIDREAM_NO_REFERENCE = {
    "fbcache": "diffusers 0.39's First Block Cache does not run on HiDream's transformer (apply_first_block_cache "
    "finds none of its block lists, double_stream_blocks and single_stream_blocks, and fails), so there is no "
    "reference to reproduce",
    "magcache": "diffusers 0.39's MagCache finds none of HiDream's block lists (double_stream_blocks, "
    "single_stream_blocks), hooks nothing and runs every step in full, so there is no reference to reproduce",
    "taylorseer": "diffusers 0.39's TaylorSeer (lite mode) predicts the transformer's proj_out, which HiDream's "
    "lacks (its output layer is final_layer), and HiDreamImagePipeline sets no cache context, which the hook "
    "needs, so there is no reference to reproduce",
}
for _mode, _why in HIDREAM_NO_REFERENCE.items():
    MODES[_mode].why_not["hidream"] = _why

# modes the issue names that the engine does not run yet: refused by name rather than as unknown
NOT_BUILT: dict[str, str] = {}


@dataclass(frozen=True)
class CacheSpec:
    mode: str
    params: tuple[tuple[str, object], ...]  # every field, given or default, in the reference's order

    @property
    def options(self) -> dict:
        return dict(self.params)

    def label(self) -> str:
        """``fbcache:threshold=0.05`` — what the PNG and the profile record, and what parses back to this."""
        shown = [(k, v) for k, v in self.params if v is not None and not (k == "calibrate" and v is False)]
        return f"{self.mode}:" + ",".join(f"{k}={_text(v)}" for k, v in shown)

    def ratios_note(self) -> str | None:
        """Which magnitude ratios a MagCache run uses, for the plan: None for the other modes."""
        if self.mode != "magcache":
            return None
        ratios = self.options["mag_ratios"]
        if self.options["calibrate"]:
            return "calibrating: every step runs in full and the magnitude ratios are measured and reported"
        if ratios is None or isinstance(ratios, str):
            return f"magnitude ratios: {MAG_RATIOS_NOTES[ratios or 'flux']}"
        return f"magnitude ratios: the {len(ratios)} given"

    def resolved(self, steps_run: int, family: str | None = None) -> CacheSpec:
        """The spec with the run's own values filled in: MagCache's num_inference_steps (None: the run's) and,
        on a family whose published ratios are not FLUX's (the None default's), their name (``family``: the
        model's; the label then records them)."""
        spec = self
        if self.mode == "magcache" and self.options["num_inference_steps"] is None:
            spec = spec._with("num_inference_steps", steps_run)
        published = PUBLISHED_MAG_RATIOS.get(family)
        if self.mode == "magcache" and self.options["mag_ratios"] is None and published and published[0] != "flux":
            spec = spec._with("mag_ratios", published[0])
        return spec

    def _with(self, key: str, value) -> CacheSpec:
        return CacheSpec(self.mode, tuple((k, value if k == key else v) for k, v in self.params))

    def schedule(self, steps: int) -> list[bool] | None:
        """Which of ``steps`` calls run the whole denoiser (True), for the modes that fix it in advance."""
        if self.mode == "taylorseer":
            return taylorseer_schedule(self.options, steps)
        if self.mode == "magcache":
            return magcache_schedule(self.options, steps)
        if self.mode == "deepcache":  # uniform: every cache_interval-th timestep from the first
            return [step % self.options["cache_interval"] == 0 for step in range(steps)]
        return None


def _text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ",".join(_text(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _items(rest: str) -> list[str]:
    """``key=value`` items split on the commas outside brackets (``mag_ratios=[1.0, 1.02, ...]`` is one)."""
    items, depth, current = [], 0, ""
    for char in rest:
        depth += (char == "[") - (char == "]")
        if char == "," and depth <= 0:
            items.append(current)
            current = ""
        else:
            current += char
    return [item.strip() for item in [*items, current] if item.strip()]


def _ratios(mode: Mode, text: str):
    """``mag_ratios``: a published set by name (flux) or a list of numbers, as diffusers' calibration prints it."""
    if text.lower() in NAMED_MAG_RATIOS:
        return text.lower()
    bad = f"--cache {mode.name}: mag_ratios={text} is not "
    if not (text.startswith("[") and text.endswith("]")):
        raise InputError(bad + f"{' or '.join(NAMED_MAG_RATIOS)} or a list of numbers like [1.0,1.02,0.98]")
    try:
        values = tuple(float(v) for v in text[1:-1].replace(" ", "").split(",") if v)
    except ValueError:
        raise InputError(bad + "a list of numbers like [1.0,1.02,0.98]") from None
    if not values or not all(0 < v < float("inf") for v in values):
        raise InputError(bad + "a list of positive finite numbers")
    return values


def _value(mode: Mode, key: str, text: str, default):
    bad = f"--cache {mode.name}: {key}={text} is not "
    if key in mode.optional_ints and text.lower() == "none":
        return None
    if isinstance(default, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise InputError(bad + "true or false")
    if isinstance(default, int) or key in mode.optional_ints:
        try:
            value = int(text)
        except ValueError:
            raise InputError(bad + "a whole number") from None
        if value < 0 or (value < 1 and key in ("cache_interval", "max_order", "num_inference_steps")):
            raise InputError(bad + ("at least 1" if key != "max_skip_steps" else "at least 0"))
        return value
    try:
        value = float(text)
    except ValueError:
        raise InputError(bad + "a number") from None
    if not value >= 0 or value == float("inf"):
        raise InputError(bad + "a finite number of at least 0")
    return value


def parse(text: str | None) -> CacheSpec | None:
    """``MODE[:key=value,...]`` → CacheSpec; None or ``off``/``none`` → None. Raises InputError (one line)."""
    if text is None or text.strip().lower() in ("", "off", "none"):
        return None
    name, _, rest = text.strip().partition(":")
    name = name.strip().lower()
    if name in NOT_BUILT:
        raise InputError(
            f"--cache {name} ({NOT_BUILT[name]}) is not built in Stepwise yet; use {', '.join(MODES)} or no --cache"
        )
    mode = MODES.get(name)
    if mode is None:
        raise InputError(f"--cache {name!r} is not a cache mode; use one of {', '.join(MODES)} (or off)")
    values = dict(mode.fields)
    for item in _items(rest):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not raw.strip():
            raise InputError(f"--cache {name}: {item!r} is not key=value; e.g. --cache {_example(mode)}")
        if key not in mode.fields:
            raise InputError(f"--cache {name} has no key {key!r}; its keys: {', '.join(mode.fields)}")
        value = raw.strip()
        values[key] = _ratios(mode, value) if key == "mag_ratios" else _value(mode, key, value, mode.fields[key])
    if name == "deepcache" and values["cache_branch_id"] != 0:
        raise InputError(
            f"--cache deepcache:cache_branch_id={values['cache_branch_id']} caches at another depth of the UNet than "
            f"the split `stepwise export --cache-graphs` writes (branch 0: the last up block's last layer); use "
            f"cache_branch_id=0"
        )
    return CacheSpec(name, tuple(values.items()))


def _example(mode: Mode) -> str:
    shown = [(k, v) for k, v in mode.fields.items() if v is not None]
    return f"{mode.name}:" + ",".join(f"{k}={_text(v)}" for k, v in shown)


def lacks_mag_ratios(spec: CacheSpec, family: str) -> bool:
    """A MagCache run with no ratios given or measured, on a family with none published (SD 3)."""
    options = spec.options
    return (
        spec.mode == "magcache"
        and options["mag_ratios"] is None
        and not options["calibrate"]
        and family not in PUBLISHED_MAG_RATIOS
    )


def check(spec: CacheSpec | None, model, family: str, steps_run: int) -> None:
    """Refuse a cache a model cannot use, with the reason: a few-step distilled model (each of its few steps
    changes the image a lot: nothing to reuse), a family the mode does not run on, a run no longer than the
    mode's warm-up (nothing would be cached)."""
    if spec is None:
        return
    mode = MODES[spec.mode].given(spec.options)
    if model.few_step:
        raise InputError(
            f"--cache is refused for {model.name}: a few-step distilled model changes the image a lot at each of "
            f"its steps, so there is nothing to reuse; run it without --cache"
        )
    if family not in mode.families:
        why = mode.why_not.get(family, f"the engine runs {mode.name} on {', '.join(mode.families)} only")
        raise InputError(f"--cache {mode.name} is not available for {family}: {why}; run without --cache")
    options = spec.options
    if lacks_mag_ratios(spec, family):
        raise InputError(
            f"--cache magcache needs magnitude ratios for {model.name}, and none are published for {family} "
            f"(diffusers ships FLUX's only): measure this model's once with --cache magcache:calibrate=true and "
            f"pass the printed ones as mag_ratios=[...], or use FLUX.1-dev's with mag_ratios=flux"
        )
    if spec.mode == "magcache" and options["calibrate"]:
        return  # computes every step on purpose: it measures the ratios
    schedule = spec.resolved(steps_run, family).schedule(steps_run)
    if spec.mode == "deepcache" and options["cache_interval"] == 1:  # no run is long enough to cache anything
        raise InputError(
            f"--cache {spec.label()} runs the whole UNet at every step (cache_interval=1, the helper's default), "
            f"so it caches nothing; give cache_interval=3 (or more), or drop --cache"
        )
    if (schedule is not None and all(schedule)) or steps_run <= 1:
        raise InputError(
            f"--cache {spec.label()} computes every one of {steps_run} steps in full (its warm-up covers the run), "
            f"so it caches nothing; run more steps or drop --cache"
        )


def full_evaluations(spec: CacheSpec | None, steps_run: int) -> tuple[int, int]:
    """(fewest, most) steps that run the whole denoiser: exact for a fixed schedule, a range for fbcache."""
    if spec is None:
        return steps_run, steps_run
    schedule = spec.resolved(steps_run).schedule(steps_run)
    if schedule is None:
        return 1, steps_run  # fbcache: the first step always, the rest as they come
    return sum(schedule), sum(schedule)


# --- the fixed schedules, as the reference hooks decide them ----------------------------------------------


def taylorseer_schedule(options: dict, steps: int) -> list[bool]:
    """TaylorSeerCacheHook._measure_should_compute for calls 0 .. steps-1."""
    before, interval = options["disable_cache_before_step"], options["cache_interval"]
    after = options["disable_cache_after_step"]
    return [
        step < before or (step - before - 1) % interval == 0 or (after is not None and step >= after)
        for step in range(steps)
    ]


def mag_ratios(count: int, given=None) -> np.ndarray:
    """The ratios (``given``: None or "flux" for FLUX_MAG_RATIOS, else a tuple) as MagCacheConfig holds them
    for ``count`` steps: float32, nearest_interp'd when the length differs (torch.round is round-half-even,
    as numpy's)."""
    given = NAMED_MAG_RATIOS[given or "flux"] if given is None or isinstance(given, str) else given
    ratios = np.asarray(given, dtype=np.float32)
    if count == len(ratios):
        return ratios
    if count == 1:
        return ratios[-1:]
    scale = np.float32((len(ratios) - 1) / (count - 1))
    index = np.round(np.arange(count, dtype=np.float32) * scale).astype(np.int64)
    return ratios[index]


def magcache_schedule(options: dict, steps: int) -> list[bool]:
    """MagCacheHeadHook's decisions for calls 0 .. steps-1 (float32 accumulators, as the hook's tensors are);
    the hook resets itself after ``num_inference_steps`` calls, and so does this."""
    total = options["num_inference_steps"] or steps
    if options["calibrate"]:  # the reference never skips while it calibrates
        return [True] * steps
    ratios = mag_ratios(total, options["mag_ratios"])
    threshold = np.float32(options["threshold"])
    retention = int(options["retention_ratio"] * total + 0.5)
    decisions = []
    index, have_residual = 0, False
    ratio, err, skipped = np.float32(1.0), np.float32(0.0), 0
    for _ in range(steps):
        compute = True
        if index >= retention:
            scale = ratios[index] if index < len(ratios) else np.float32(1.0)
            ratio = np.float32(ratio * scale)
            skipped += 1
            err = np.float32(err + np.float32(abs(np.float32(1.0) - ratio)))
            if have_residual and err <= threshold and skipped <= options["max_skip_steps"]:
                compute = False
            else:
                ratio, err, skipped = np.float32(1.0), np.float32(0.0), 0
        decisions.append(compute)
        have_residual = have_residual or compute
        index += 1
        if index >= total:  # the hook's _advance_step: the end of its inference loop
            index, have_residual = 0, False
            ratio, err, skipped = np.float32(1.0), np.float32(0.0), 0
    return decisions


def taylor_coefficient(offset: int, order: int) -> float:
    return (offset**order) / math.factorial(order)
