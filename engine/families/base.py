"""What the shared loop needs from an architecture, and the pieces architectures share.

An architecture object is built from the manifest alone and holds only what the export recorded (constants):
nothing of one generation is stored on it. Its methods take the graphs of the phase that runs them and
return what they compute, so one loaded pipeline can serve several generations at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import EngineError
from ..sampling import Denoise
from ..text_encoders import TextEncoder


def classifier_free_guidance(output: np.ndarray, scale: float) -> np.ndarray:
    """The batch is [unconditional, conditional], as diffusers orders it."""
    uncond, cond = output[:1], output[1:]
    return uncond + scale * (cond - uncond)


class Architecture:
    """A family of architectures; subclasses define how prompts and latents meet the denoiser graph."""

    #: components this architecture loads, in order: name → required?
    components: dict[str, bool] = {}
    denoiser_component = "unet"
    #: the text encoder that is a T5 (its window is the manifest's max_sequence_length), if any
    t5_component: str | None = None
    #: a denoiser that takes the mask and the masked image's latents as inputs (9-channel UNets)
    inpainting = False

    def __init__(self, manifest):
        config = manifest.config
        self.config = config
        self.vae_scale_factor = int(config.get("vae_scale_factor", 8))
        self.latent_channels = int(config.get("latent_channels", 4))
        self.timestep_scale = float(config.get("timestep_scale", 1.0))
        self.timestep_scalar = config.get("timestep_shape", "batch") == "scalar"

    @property
    def text_components(self) -> list[str]:
        return [name for name in self.components if name.startswith("text_encoder")]

    #: prompts padded to the tokenizer's window (padding="max_length"), as the CLIP/T5 pipelines tokenize
    pad_prompts = True

    def tokenizer_lengths(self) -> dict[str, int]:
        """Tokenizer windows that differ from the tokenizer's own model_max_length (the T5 window)."""
        length = self.config.get("max_sequence_length")
        if self.t5_component is None or not length:
            return {}
        return {self.t5_component.replace("text_encoder", "tokenizer"): int(length)}

    # --- conditioning
    def encode(self, graphs: dict, tokenizers: dict, prompt: str, negative: str, guidance: float):
        """→ (conditioning dict of arrays, warnings)."""
        raise NotImplementedError

    def uses_cfg(self, guidance: float) -> bool:
        return guidance > 1.0

    def denoiser_batch(self, guidance: float | None) -> int:
        """The batch the denoiser runs with (None: the model's own, guided): 2 with CFG, [uncond, cond]."""
        return 2 if guidance is None or self.uses_cfg(guidance) else 1

    def negative_prompt_used(self, negative: str, guidance: float) -> str:
        """The negative prompt a generation runs with (and records): Qwen-Image's true CFG needs one."""
        return negative

    def image_size(self, width: int, height: int) -> tuple[int, int]:
        """The size a request is generated at (HiDream rescales every request to one area)."""
        return width, height

    # --- latents
    def latent_shape(self, width: int, height: int) -> tuple[int, ...]:
        f = self.vae_scale_factor
        return (1, self.latent_channels, height // f, width // f)

    @property
    def image_scale_factor(self) -> int:
        """The multiple an image's sides are rounded down to (FLUX: 16, its latents split into 2x2 patches)."""
        return self.vae_scale_factor

    def pack(self, latents: np.ndarray) -> np.ndarray:
        return latents

    def pack_mask(self, mask: np.ndarray) -> np.ndarray:
        """A (1, 1, h, w) latent-size mask in the layout the scheduler holds latents in."""
        return mask

    def unpack(self, latents: np.ndarray, width: int, height: int) -> np.ndarray:
        return latents

    # --- schedule
    def set_timesteps(self, scheduler, steps: int, width: int, height: int, **options) -> None:
        scheduler.set_timesteps(steps, **options)

    def prepare(self, cond: dict, width: int, height: int, guidance: float) -> dict:
        """Per-generation inputs that do not change across steps (ids, time ids, guidance embeddings)."""
        return {}

    # --- the denoiser
    def cache_contexts(self, cond: dict) -> tuple[str, ...]:
        """The denoiser's calls each step, in the order ``denoiser`` makes them, named as the cache context
        diffusers' pipeline sets around each (a step cache keeps one state per context, as its hooks do): one
        call, batched CFG included, unless a family runs its texts one call each."""
        return ("cond",)

    def context_count(self, guidance: float | None) -> int:
        """How many cache contexts (``cache_contexts``) a generation with ``guidance`` runs, before its
        conditioning exists: the memory plan counts a step cache's state once per context."""
        return 1

    def denoiser(self, graph, cond: dict, extra: dict, guidance: float) -> Denoise:
        """The graph wrapped as ``denoise(x, t)`` → the prediction the scheduler steps with."""
        raise NotImplementedError

    def timestep(self, t, batch: int) -> np.ndarray:
        """t as the graph takes it: a scalar (optimum's UNets) or one per sample, times the recorded scale."""
        # FLUX's pipeline divides by 1000; dividing (not multiplying by float32(0.001)) gives its exact float32
        value = np.float32(t) / np.float32(1.0 / self.timestep_scale)
        return np.asarray(value, dtype=np.float32) if self.timestep_scalar else np.full((batch,), value, np.float32)


def encode_text(encoders: list[TextEncoder], text: str, warnings: list[str]) -> list:
    """Run each encoder on ``text``, noting a truncated prompt once per encoder."""
    outputs = []
    for encoder in encoders:
        out = encoder(text)
        if out.truncated:
            note = (
                f"the prompt is longer than {encoder.tokenizer.name}'s {encoder.max_length}-token window "
                f"and was truncated; shorten it to keep its end"
            )
            if note not in warnings:
                warnings.append(note)
        outputs.append(out)
    return outputs


def read_scheduler(folder: Path) -> dict:
    """``folder/scheduler_config.json``, as the export wrote it (a cascade has one folder per stage and scheduler)."""
    path = folder / "scheduler_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EngineError(f"{path} cannot be read ({exc}); export the model again") from None
    if not isinstance(config, dict) or "_class_name" not in config:
        raise EngineError(f"{path} names no scheduler class; export the model again")
    return config
