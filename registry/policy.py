"""Step policy and input checks, applied before anything is loaded.

The numbers come from the registry (the user's steps guide). Few-step distilled models get *worse*
with more steps, so for them "too many" is the message that matters.
"""

from __future__ import annotations

from dataclasses import dataclass

from .models import Family, Model

OK, WARN, REFUSE = "ok", "warn", "refuse"
MAX_SEED = 2**63 - 1


class InputError(ValueError):
    """Bad input: the message names the problem and the fix, and the CLI exits 2."""


@dataclass(frozen=True)
class StepDecision:
    steps: int
    verdict: str  # OK, WARN or REFUSE
    advice: str  # one line: why, and what to use instead ("" when nothing needs saying)
    default: bool = False

    @property
    def refused(self) -> bool:
        return self.verdict == REFUSE


def step_range(model: Model) -> str:
    lo, hi = model.recommended_steps
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def plural(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def decide_steps(model: Model, steps: int | None) -> StepDecision:
    """Judge a step count for a model: OK inside the recommended range, WARN inside [min, max useful],
    REFUSE outside it. ``steps=None`` takes the model's default."""
    if steps is None:
        return StepDecision(
            model.default_steps,
            OK,
            f"{plural(model.default_steps)}, the default for {model.name} ({model.reason})",
            default=True,
        )
    if steps < 1:
        raise InputError(f"--steps must be at least 1 (got {steps}); {model.name} defaults to {model.default_steps}")
    lo, hi = model.recommended_steps
    rec = f"recommended {step_range(model)}, default {model.default_steps}"
    if lo <= steps <= hi:
        return StepDecision(steps, OK, f"{plural(steps)} is in {model.name}'s recommended range ({step_range(model)})")
    too_many = steps > hi
    if model.few_step and too_many:
        why = (
            f"{model.name} is distilled for {step_range(model)} steps: {plural(steps)} make the image worse, not better"
        )
    elif too_many:
        why = (
            f"{plural(steps)} is past {model.name}'s recommended {step_range(model)}: slower, "
            f"with little or no visible gain"
        )
    else:
        why = f"{plural(steps)} is too few for {model.name}: expect a blurry, unfinished image"
    if model.min_steps <= steps <= model.max_useful_steps:
        use = f"--steps {hi if too_many else lo}"
        return StepDecision(steps, WARN, f"{why}; {use} is the better choice")
    bound = f"at most {model.max_useful_steps}" if too_many else f"at least {model.min_steps}"
    return StepDecision(
        steps,
        REFUSE,
        f"{why} ({model.name} takes {bound} steps; {rec}). Use --steps {model.default_steps}, or --force to run anyway",
    )


def check_guidance(model: Model, guidance: float | None) -> float:
    """The guidance to use: the model's default, or a user value that makes sense for the model."""
    if guidance is None:
        return model.guidance
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
        if value % m:
            lower = max(fam.min_size, value // m * m)
            raise InputError(
                f"--{name} {value} is not a multiple of {m}, which {model.name}'s architecture needs; "
                f"use --{name} {lower} or {lower + m}"
            )
        if not fam.min_size <= value <= fam.max_size:
            raise InputError(
                f"--{name} {value} is outside {fam.min_size}-{fam.max_size} for {model.name}; "
                f"its native size is {native_w}x{native_h}"
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
