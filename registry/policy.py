"""Step policy and input checks, applied before anything is loaded.

The numbers come from the registry (the user's steps guide). Few-step distilled models get *worse*
with more steps, so for them "too many" is the message that matters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .models import Family, Model

OK, WARN, REFUSE = "ok", "warn", "refuse"
MAX_SEED = 2**63 - 1


class InputError(ValueError):
    """Bad input: the message names the problem and the fix, and the CLI exits 2."""


@dataclass(frozen=True)
class StepDecision:
    steps: int  # the schedule's length (--steps)
    verdict: str  # OK, WARN or REFUSE
    advice: str  # one line: why, and what to use instead ("" when nothing needs saying)
    default: bool = False
    steps_run: int | None = None  # image-to-image runs the schedule's tail: int(steps x strength)

    def __post_init__(self):
        if self.steps_run is None:
            object.__setattr__(self, "steps_run", self.steps)

    @property
    def refused(self) -> bool:
        return self.verdict == REFUSE


def step_range(model: Model) -> str:
    lo, hi = model.recommended_steps
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def plural(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def steps_run(steps: int, strength: float | None, rounding: str = "floor") -> int:
    """How many steps image-to-image runs, in the float arithmetic of diffusers' ``get_timesteps``:
    SD/SDXL ("floor") int(steps x strength); SD3/FLUX ("ceil") steps - int(steps - steps x strength); LCM
    ("all") every step, from a schedule its scheduler starts lower."""
    if strength is None or rounding == "all":
        return steps
    if rounding == "ceil":
        return steps - int(max(steps - min(steps * strength, steps), 0))
    return min(int(steps * strength), steps)


def steps_for(run: int, strength: float | None, rounding: str = "floor") -> int:
    """The fewest --steps whose tail at ``strength`` runs ``run`` steps."""
    if strength is None:
        return run
    steps = max(run, math.floor(run / strength) - 1, 1)
    while steps_run(steps, strength, rounding) < run:
        steps += 1
    return steps


def decide_steps(
    model: Model, steps: int | None, strength: float | None = None, rounding: str = "floor", option: str = "--steps"
) -> StepDecision:
    """Judge a step count for a model: OK inside the recommended range, WARN inside [min, max useful],
    REFUSE outside it. ``steps=None`` takes the model's default. With ``strength`` (image-to-image) the
    steps judged are those that run, int(steps x strength), and the default runs the model's default."""
    if steps is None:
        run = model.default_steps
        return StepDecision(
            steps_for(run, strength, rounding),
            OK,
            f"{plural(run)}, the default for {model.name} ({model.reason})",
            default=True,
            steps_run=run,
        )
    if steps < 1:
        raise InputError(f"{option} must be at least 1 (got {steps}); {model.name} defaults to {model.default_steps}")
    run = steps_run(steps, strength, rounding)
    of = "" if strength is None else f" (with --strength {strength:g}, {run} of {plural(steps)} run)"
    if strength is not None and run < 1:  # not a policy question: nothing would run, --force or not
        raise InputError(
            f"--strength {strength:g} with {plural(steps)} runs no step; "
            f"use {option} {steps_for(model.default_steps, strength, rounding)}, or a higher --strength"
        )
    lo, hi = model.recommended_steps
    rec = f"recommended {step_range(model)}, default {model.default_steps}"
    if lo <= run <= hi:
        return StepDecision(
            steps, OK, f"{plural(run)} is in {model.name}'s recommended range ({step_range(model)}){of}", steps_run=run
        )
    too_many = run > hi
    if model.few_step and too_many:
        why = f"{model.name} is distilled for {step_range(model)} steps: {plural(run)} make the image worse, not better"
    elif too_many:
        why = (
            f"{plural(run)} is past {model.name}'s recommended {step_range(model)}: slower, "
            f"with little or no visible gain"
        )
    else:
        why = f"{plural(run)} is too few for {model.name}: expect a blurry, unfinished image"
    why += of
    if model.min_steps <= run <= model.max_useful_steps:
        use = f"{option} {steps_for(hi if too_many else lo, strength, rounding)}"
        return StepDecision(steps, WARN, f"{why}; {use} is the better choice", steps_run=run)
    bound = f"at most {model.max_useful_steps}" if too_many else f"at least {model.min_steps}"
    return StepDecision(
        steps,
        REFUSE,
        f"{why} ({model.name} takes {bound} steps; {rec}). "
        f"Use {option} {steps_for(model.default_steps, strength, rounding)}, or --force to run anyway",
        steps_run=run,
    )


def check_guidance(model: Model, guidance: float | None) -> float:
    """The guidance to use: the model's default, or a user value that makes sense for the model."""
    if guidance is None:
        return model.guidance
    if not math.isfinite(guidance):
        raise InputError(
            f"--guidance must be a finite number (got {guidance}); {model.name} defaults to {model.guidance}"
        )
    if guidance < 0:
        raise InputError(f"--guidance must be 0 or more (got {guidance}); {model.name} defaults to {model.guidance}")
    if not model.uses_guidance and guidance not in (0.0, 1.0):
        raise InputError(
            f"{model.name} takes no guidance (it was distilled without classifier-free guidance); "
            f"drop --guidance, or pass --guidance 0"
        )
    return guidance


def check_size(
    model: Model, fam: Family, width: int | None, height: int | None, native: tuple[int, int] | None = None
) -> tuple[int, int]:
    """Width and height to generate at; ``native`` is the exported model's own size when it differs from
    the registry's (a tiny stand-in is trained for nothing, but its graphs are sized for small images)."""
    native_w, native_h = native or (model.width, model.height)
    width = native_w if width is None else width
    height = native_h if height is None else height
    m = fam.size_multiple
    for name, value in (("width", width), ("height", height)):
        if not fam.min_size <= value <= fam.max_size:
            raise InputError(
                f"--{name} {value} is outside {fam.min_size}-{fam.max_size} for {model.name}; "
                f"its native size is {native_w}x{native_h}"
            )
        if value % m:
            lower = max(fam.min_size, value // m * m)
            upper = lower + m if lower + m <= fam.max_size else None
            use = f"--{name} {lower}" + (f" or {upper}" if upper else "")
            raise InputError(
                f"--{name} {value} is not a multiple of {m}, which {model.name}'s architecture needs; use {use}"
            )
    return width, height


def check_seed(seed: int | None) -> int | None:
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise InputError(f"--seed must be between 0 and {MAX_SEED} (got {seed})")
    return seed


def check_prompt(prompt: str | None) -> str:
    if prompt is None or not prompt.strip():
        raise InputError('the prompt is empty; say what to draw, e.g. stepwise generate "a red apple"')
    return prompt.strip()
