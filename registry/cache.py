"""Step caching: ``--cache MODE[:key=value,...]`` parsed, checked and judged before anything is loaded.

A mode reuses work from earlier steps instead of running the whole denoiser every step, exactly as its
reference implementation does (the keys are the reference config's own field names, with its defaults).
The numbers are the engine's (engine/cache.py); this module only knows the modes' names, fields, families
and warm-ups, so the CLI, the server and batch refuse the same requests with the same one-line reasons.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .policy import InputError

# the transformer's graphs the transformer-family modes run (exporters/split.py writes them), in order
SPLIT_GRAPHS = ("transformer_first_block", "transformer_blocks", "transformer_out")


@dataclass(frozen=True)
class Mode:
    name: str
    reference: str  # the implementation whose decisions and outputs the engine reproduces
    fields: dict  # field → default (the reference config's); the default's type is the field's type
    families: tuple[str, ...]  # where the engine runs it
    warmup: int  # steps always computed in full before the first cached one can happen
    why_not: dict = field(default_factory=dict)  # family → why the mode is not offered there


FBCACHE = Mode(
    name="fbcache",
    reference="diffusers 0.39 FirstBlockCacheConfig / apply_first_block_cache",
    fields={"threshold": 0.05},
    families=("flux",),
    warmup=1,  # the first step has no earlier residual to compare with
    why_not={
        "sd3": (
            "diffusers 0.39's First Block Cache cannot run SD3's transformer (its last joint block returns no "
            "encoder states and the hook fails there), so there is no reference to reproduce"
        ),
    },
)
MODES = {m.name: m for m in (FBCACHE,)}
# modes the issue names that the engine does not run yet: refused by name rather than as unknown
NOT_BUILT = {
    "magcache": "diffusers' MagCacheConfig",
    "taylorseer": "diffusers' TaylorSeerCacheConfig",
    "deepcache": "the deepcache package's DeepCacheSDHelper",
}


@dataclass(frozen=True)
class CacheSpec:
    mode: str
    params: tuple[tuple[str, object], ...]  # every field, given or default, in the reference's order

    @property
    def options(self) -> dict:
        return dict(self.params)

    def label(self) -> str:
        """``fbcache:threshold=0.05`` — what the PNG and the profile record, and what parses back to this."""
        return f"{self.mode}:" + ",".join(f"{k}={_text(v)}" for k, v in self.params)


def _text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _value(mode: Mode, key: str, text: str, default):
    bad = f"--cache {mode.name}: {key}={text} is not "
    if isinstance(default, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise InputError(bad + "true or false")
    if isinstance(default, int):
        try:
            value = int(text)
        except ValueError:
            raise InputError(bad + "a whole number") from None
        if value < 1:
            raise InputError(bad + "at least 1")
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
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not raw.strip():
            raise InputError(f"--cache {name}: {item!r} is not key=value; e.g. --cache {_example(mode)}")
        if key not in mode.fields:
            raise InputError(f"--cache {name} has no key {key!r}; its keys: {', '.join(mode.fields)}")
        values[key] = _value(mode, key, raw.strip(), mode.fields[key])
    return CacheSpec(name, tuple(values.items()))


def _example(mode: Mode) -> str:
    return f"{mode.name}:" + ",".join(f"{k}={_text(v)}" for k, v in mode.fields.items())


def check(spec: CacheSpec | None, model, family: str, steps_run: int) -> None:
    """Refuse a cache a model cannot use, with the reason: a few-step distilled model (each of its few steps
    changes the image a lot: nothing to reuse), a family the mode does not run on, a run no longer than the
    mode's warm-up (nothing would be cached)."""
    if spec is None:
        return
    mode = MODES[spec.mode]
    if model.few_step:
        raise InputError(
            f"--cache is refused for {model.name}: a few-step distilled model changes the image a lot at each of "
            f"its steps, so there is nothing to reuse; run it without --cache"
        )
    if family not in mode.families:
        why = mode.why_not.get(family, f"the engine runs {mode.name} on {', '.join(mode.families)} only")
        raise InputError(f"--cache {mode.name} is not available for {family}: {why}; run without --cache")
    if steps_run <= mode.warmup:
        raise InputError(
            f"--cache {mode.name} computes its first {mode.warmup} step(s) in full, so a {steps_run}-step run "
            f"caches nothing; run more steps or drop --cache"
        )


def full_evaluations(spec: CacheSpec | None, steps_run: int) -> tuple[int, int]:
    """(fewest, most) steps that run the whole denoiser: fbcache decides each step as it goes."""
    if spec is None:
        return steps_run, steps_run
    return MODES[spec.mode].warmup, steps_run
