"""The model registry: every model Stepwise knows, loaded from ``models.json`` (data, not code)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from . import footprint

DATA = Path(__file__).with_name("models.json")


@dataclass(frozen=True)
class Family:
    name: str
    denoiser: str  # "unet" or "transformer"
    exportable: bool
    size_multiple: int
    min_size: int
    max_size: int
    text_encoders: tuple[str, ...]
    policy_model: str  # the registry entry whose step policy an unregistered export of this family gets
    # diffusers' default `strength` of the family's img2img and inpaint pipelines (None: no such pipeline)
    img2img_strength: float | None = None
    inpaint_strength: float | None = None
    strength_steps: str = "floor"  # how get_timesteps counts the steps that run (registry/policy.steps_run)
    # export formats when --weights / --text-encoder-weights are not given: Qwen-Image exists for a CPU only at 4 bits
    default_weights: dict = field(default_factory=dict)

    def default_strength(self, inpaint: bool) -> float | None:
        return self.inpaint_strength if inpaint else self.img2img_strength


@dataclass(frozen=True)
class Model:
    id: str
    name: str
    menu: int
    family: str
    hub_id: str
    kind: str  # "few-step", "standard" or "quality"
    min_steps: int
    default_steps: int
    recommended_steps: tuple[int, int]
    max_useful_steps: int
    guidance: float
    cfg: bool
    width: int
    height: int
    reason: str
    params_m: dict
    scheduler: dict
    guidance_embedded: bool = False
    parts: dict = field(default_factory=dict)
    # how image-to-image counts the steps that run, when the model's sampler differs from its family's: LCM's
    # scheduler takes strength into its own schedule and runs every step ("all")
    strength_steps: str | None = None
    # the engine's activation estimate for the denoiser at the default size, batch as the policy runs it
    # (registry/footprint.py); None where no engine runs the model yet
    activations_mb: dict | None = None  # {"denoiser": MB, "decode": MB}; a cascade: "denoiser_2", no "decode"
    # a format's peak measured at full size where the estimate above misses it by more than 25% (DeepFloyd IF's
    # int8: its stage I's int8 convolutions; docs/benchmarks.md "DeepFloyd IF at full size"): {format: MB}
    measured_mb: dict | None = None
    # a cascade's later stages (DeepFloyd IF's stage II), each with its checkpoint and its own step policy:
    # {"stage", "name", "hub_id", "min_steps", "default_steps", "recommended_steps", "max_useful_steps", "guidance"};
    # an optional stage with components of its own (IF's stage III) adds their "params_m" and "activations_mb"
    stages: tuple = ()

    def stage(self, number: int) -> Model:
        """Stage ``number`` (2, 3) of a cascade as a model with its own step policy and guidance (DeepFloyd IF's
        stage II), for registry.policy to judge its steps with."""
        for spec in self.stages:
            if int(spec["stage"]) == number:
                return replace(
                    self,
                    name=f"{self.name.split(' (')[0]} stage {'I' * number} ({spec['name']})",
                    hub_id=spec["hub_id"],
                    min_steps=int(spec["min_steps"]),
                    default_steps=int(spec["default_steps"]),
                    recommended_steps=tuple(spec["recommended_steps"]),
                    max_useful_steps=int(spec["max_useful_steps"]),
                    guidance=float(spec["guidance"]),
                    width=int(spec["width"]),
                    height=int(spec["height"]),
                    reason=spec["reason"],
                    stages=(),
                )
        raise KeyError(f"{self.id} has no stage {number}")

    @property
    def few_step(self) -> bool:
        return self.kind == "few-step"

    @property
    def uses_guidance(self) -> bool:
        """Whether a guidance scale means anything: CFG, or guidance embedded in the model (LCM, FLUX-dev)."""
        return self.cfg or self.guidance_embedded

    @property
    def total_params_m(self) -> int:
        return sum(self.params_m.values())

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "menu": self.menu,
            "family": self.family,
            "hub_id": self.hub_id,
            "kind": self.kind,
            "min_steps": self.min_steps,
            "default_steps": self.default_steps,
            "recommended_steps": list(self.recommended_steps),
            "max_useful_steps": self.max_useful_steps,
            "guidance": self.guidance,
            "cfg": self.cfg,
            "guidance_embedded": self.guidance_embedded,
            "width": self.width,
            "height": self.height,
            "reason": self.reason,
            "params_m": dict(self.params_m),
            "parts": dict(self.parts),
            "scheduler": self.scheduler.get("_class_name"),
            "memory_mb": {fmt: _round(footprint.need_mb(self, fmt)) for fmt in footprint.FORMATS},
            "stages": [dict(stage) for stage in self.stages],  # a cascade's later stages and their policies
        }


def _round(mb: float | None) -> int | None:
    return None if mb is None else int(round(mb))


@lru_cache(maxsize=1)
def _load() -> tuple[tuple[Model, ...], dict[str, Family]]:
    data = json.loads(DATA.read_text())
    families = {
        name: Family(name=name, **{**spec, "text_encoders": tuple(spec["text_encoders"])})
        for name, spec in data["families"].items()
    }
    models = []
    for spec in data["models"]:
        spec = dict(spec)
        spec["recommended_steps"] = tuple(spec["recommended_steps"])
        spec["stages"] = tuple(spec.get("stages", ()))
        models.append(Model(**spec))
    return tuple(sorted(models, key=lambda m: m.menu)), families


def all_models() -> tuple[Model, ...]:
    return _load()[0]


def families() -> dict[str, Family]:
    return _load()[1]


def family(name: str) -> Family:
    try:
        return families()[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(families())}") from None


def find(key: str | int) -> Model | None:
    """A model by registry id or menu number (as typed at the interactive prompt)."""
    key = str(key).strip()
    for model in all_models():
        if key in (model.id, str(model.menu)):
            return model
    return None


def get(key: str | int) -> Model:
    model = find(key)
    if model is None:
        ids = ", ".join(m.id for m in all_models())
        raise KeyError(f"unknown model {key!r}; known models: {ids}")
    return model
