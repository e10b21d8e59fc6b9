"""One generation request, checked and planned before anything is loaded.

``plan_request`` is the one place the step policy and the input checks are applied to a request: the CLI's
``generate`` and the server (``serve/``) both call it, so a request the CLI refuses is refused by the server
with the same message. Like the rest of ``registry`` it imports nothing heavier than the stdlib.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import cache as step_cache
from . import policy
from .models import Family, Model
from .policy import InputError, StepDecision


class Refused(InputError):
    """The step policy refuses the step count (and ``force`` was not given); the message says why and what to use."""

    def __init__(self, decision: StepDecision):
        super().__init__(f"refused: {decision.advice}")
        self.decision = decision


@dataclass(frozen=True)
class Plan:
    """A request as it will run: every value checked, every default filled in."""

    prompt: str
    negative: str
    decision: StepDecision  # the policy's verdict on the steps (steps_run: the steps that run)
    guidance: float
    width: int
    height: int
    seed: int  # drawn at random when the request gave none
    strength: float | None  # image-to-image only: the family's default when not given
    seed_given: bool = True
    decision_2: StepDecision | None = None  # a cascade's stage II (DeepFloyd IF): its own step policy
    decision_3: StepDecision | None = None  # its stage III (IF's x4 upscaler), when the export has one
    cache: step_cache.CacheSpec | None = None  # the step cache the run uses (--cache), checked

    @property
    def full_evaluations(self) -> tuple[int, int]:
        """(fewest, most) steps that run the whole denoiser: all of them without a cache."""
        return step_cache.full_evaluations(self.cache, self.decision.steps_run)

    @property
    def steps(self) -> int:
        """The schedule's length, as ``Pipeline.generate(steps=...)`` takes it."""
        return self.decision.steps

    @property
    def stage_steps(self) -> dict[str, int]:
        """A cascade's later stages' steps as generate takes them (``steps_2``, ``steps_3``), for those it has."""
        stages = {"steps_2": self.decision_2, "steps_3": self.decision_3}
        return {name: decision.steps for name, decision in stages.items() if decision is not None}

    @property
    def warning(self) -> str | None:
        """The policy's advice when the steps are outside the recommended range (run anyway), else None."""
        decisions = (self.decision, self.decision_2, self.decision_3)
        notes = [d.advice for d in decisions if d is not None and d.verdict != policy.OK]
        return "; ".join(notes) or None


def random_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def check_strength(strength: float | None) -> None:
    if strength is not None and not 0.0 < strength <= 1.0:
        raise InputError(f"--strength must be in (0, 1] (got {strength}); 1 repaints everything")


def start_strength(family: Family, strength: float | None, inpaint: bool) -> float | None:
    """Image-to-image's strength: the given one (checked), or the family's diffusers default."""
    check_strength(strength)
    return family.default_strength(inpaint=inpaint) if strength is None else strength


def start_size(family: Family, image_size: tuple[int, int]) -> tuple[int, int]:
    """The size image-to-image generates at by default: the image's, rounded down to the family's multiple."""
    m = family.size_multiple
    w, h = (max(v - v % m, family.min_size) for v in image_size)
    return w, h


def stage_decisions(
    model: Model, steps_2: int | None, steps_3: int | None, *, stage_3: bool, force: bool = False
) -> tuple[StepDecision | None, StepDecision | None]:
    """A cascade's later stages' step decisions (stage II's, stage III's; None where there is no such stage):
    ``--steps-2``/``--steps-3`` judged by each stage's own policy. ``stage_3``: the export has stage III. Raises
    ``InputError`` for a stage the model or its export lacks, and ``Refused`` unless ``force``; the server
    checks its defaults with ``force`` (a refusal is each request's, as ``steps``')."""
    decision_2 = None
    if model.stages:  # a cascade: stage II's steps have their own policy (--steps-2)
        decision_2 = policy.decide_steps(model.stage(2), steps_2, option="--steps-2")
        if decision_2.refused and not force:
            raise Refused(decision_2)
    elif steps_2 is not None:
        raise InputError(f"--steps-2 is for a cascade's second stage (DeepFloyd IF); {model.name} has one stage")
    decision_3 = None
    if stage_3 or steps_3 is not None:
        if not any(int(s["stage"]) == 3 for s in model.stages):
            raise InputError(
                f"--steps-3 is for a cascade's third stage (DeepFloyd IF's x4 upscaler); {model.name} has none"
            )
        if not stage_3:
            raise InputError(
                f"--steps-3 is for stage III (the x4 upscaler), which this {model.name} export lacks; drop it, or "
                f"export with --stage-3"
            )
        decision_3 = policy.decide_steps(model.stage(3), steps_3, option="--steps-3")
        if decision_3.refused and not force:
            raise Refused(decision_3)
    return decision_2, decision_3


def plan_request(
    model: Model,
    family: Family,
    *,
    prompt: str | None,
    negative: str = "",
    steps: int | None = None,
    guidance: float | None = None,
    width: int | None = None,
    height: int | None = None,
    seed: int | None = None,
    force: bool = False,
    native: tuple[int, int] | None = None,
    image_size: tuple[int, int] | None = None,
    inpaint: bool = False,
    strength: float | None = None,
    threads: int | None = None,
    steps_2: int | None = None,
    steps_3: int | None = None,
    stage_3: bool = False,
    cache: str | None = None,
) -> Plan:
    """Check a request against ``model``'s step policy and ``family``'s limits and fill in its defaults.

    ``native``: the export's own size when it differs from the registry's (a tiny stand-in); ``image_size``:
    the start image's size (image-to-image; the default output size, rounded to the family's multiple);
    ``inpaint``: a mask was given (the family's inpainting strength is the default). Raises ``InputError``
    (one line: the problem and the fix) for bad input, and ``Refused`` for a step count the policy refuses
    unless ``force``. ``cache``: ``MODE[:key=value,...]`` (registry/cache.py), refused where it cannot help.
    ``stage_3``: the export has a cascade's stage III (IF's x4 upscaler), whose steps (``steps_3``) are judged."""
    if image_size is None:
        if inpaint:
            raise InputError("--mask needs --image: the mask says which part of an image to repaint")
        if strength is not None:
            raise InputError("--strength needs --image: it says how much of the image to repaint")
    else:
        strength = start_strength(family, strength, inpaint)
        native = start_size(family, image_size)
    prompt = policy.check_prompt(prompt)
    rounding = model.strength_steps or family.strength_steps
    decision = policy.decide_steps(model, steps, strength=strength, rounding=rounding)
    guidance = policy.check_guidance(model, guidance)
    width, height = policy.check_size(model, family, width, height, native)
    seed = policy.check_seed(seed)
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be at least 1 (got {threads})")
    if decision.refused and not force:
        raise Refused(decision)
    decision_2, decision_3 = stage_decisions(model, steps_2, steps_3, stage_3=stage_3, force=force)
    spec = step_cache.parse(cache)
    step_cache.check(spec, model, family.name, decision.steps_run)
    spec = spec.resolved(decision.steps_run, family.name) if spec is not None else None
    given = seed is not None
    return Plan(
        prompt=prompt,
        negative=negative or "",
        decision=decision,
        guidance=guidance,
        width=width,
        height=height,
        seed=seed if given else random_seed(),
        strength=strength,
        seed_given=given,
        decision_2=decision_2,
        decision_3=decision_3,
        cache=spec,
    )
