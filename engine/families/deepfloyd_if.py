"""DeepFloyd IF: a pixel-space cascade of UNets conditioned on T5 states, each stage a DDPM loop of its own.

As diffusers 0.39's IFPipeline (stage I) and IFSuperResolutionPipeline (stage II) do it:
- the prompt is ``lower().strip()``-ed (``clean_caption`` off: it needs bs4 and ftfy), tokenized to T5's 77 tokens
  with padding and encoded with the tokenizer's attention mask; the negative prompt ("" when none is given) the
  same way; both stages use the same states (diffusers' IF docs feed stage I's ``encode_prompt`` to stage II);
- the UNet predicts noise and a variance (6 channels for 3); classifier-free guidance is applied to the noise
  half alone and the variance is the text branch's (the DDPM scheduler's ``learned_range`` takes it from there);
- stage I samples (1, 3, s, s) pixels from noise; stage II draws its own starting noise, then upscales the stage I
  image with ``F.interpolate(mode="bilinear", align_corners=True)``, noises it to ``noise_level`` (250) with its
  ``image_noising_scheduler`` (one more draw), and feeds it beside the sample with the noise level as the UNet's
  ``class_labels``; guidance 4.0;
- the final image is the last stage's sample mapped as ``(x / 2 + 0.5).clamp(0, 1)``, ``* 255``, rounded.

Stage III, when exported, is diffusers' StableDiffusionUpscalePipeline (the SD x4 upscaler) called as diffusers'
IF docs call it on stage II's ``output_type="pt"`` image (the raw sample, unclamped): ``VaeImageProcessor.
preprocess`` keeps a tensor whose minimum is below 0 as it is and maps one in [0, 1] to [-1, 1]; the prompt is
encoded again by its own CLIP (the negative prompt, "" by default, too); one draw noises the image with the
``low_res_scheduler`` at ``noise_level`` (100), then one draws the (1, 4, h, w) latents at the image's own size;
each step concatenates [latents, image] on channels for the UNet, with the noise level as ``class_labels``, and
applies CFG (9.0) to the whole output; its scheduler (DDIM, v-prediction) steps; the VAE decodes
``latents / scaling_factor`` (0.08333) to 4x the size, post-processed as every SD pipeline's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EngineError
from ..text_encoders import TextEncoder
from .base import Architecture, classifier_free_guidance, encode_text, read_scheduler

MAX_SEQUENCE_LENGTH = 77  # IFPipeline.encode_prompt's fixed window
UPSCALE_PIPELINE = "StableDiffusionUpscalePipeline"  # stage III


def preprocess_text(text: str) -> str:
    """IFPipeline._text_preprocessing(text, clean_caption=False)."""
    return text.lower().strip()


def guided_noise(output: np.ndarray, channels: int, scale: float) -> np.ndarray:
    """[uncond, text] output of 2 x ``channels`` channels each → CFG on the noise, the text branch's variance."""
    uncond, text = output[:1], output[1:]
    noise = uncond[:, :channels] + np.float32(scale) * (text[:, :channels] - uncond[:, :channels])
    return np.concatenate([noise, text[:, channels:]], axis=1)


def upscale_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``F.interpolate(image, (height, width), mode="bilinear", align_corners=True)`` for an (N, C, h, w) float32
    array: source positions ``i * (h - 1) / (height - 1)`` as float32, rows blended first within each column
    pair, as PyTorch's CPU kernel weighs the four neighbours."""
    image = np.asarray(image, dtype=np.float32)
    in_h, in_w = image.shape[-2:]

    def axis(out: int, size: int):
        scale = np.float32((size - 1) / (out - 1)) if out > 1 else np.float32(0.0)
        src = np.arange(out, dtype=np.float32) * scale
        low = np.minimum(np.floor(src).astype(np.int64), size - 1)
        high = np.minimum(low + 1, size - 1)
        frac = (src - low.astype(np.float32)).astype(np.float32)
        return low, high, frac, (np.float32(1.0) - frac).astype(np.float32)

    h0, h1, hl1, hl0 = axis(height, in_h)
    w0, w1, wl1, wl0 = axis(width, in_w)
    top = image[..., h0, :]
    bottom = image[..., h1, :]
    hl0, hl1 = hl0[:, None], hl1[:, None]
    out = hl0 * (wl0 * top[..., w0] + wl1 * top[..., w1]) + hl1 * (wl0 * bottom[..., w0] + wl1 * bottom[..., w1])
    return out.astype(np.float32)


def to_uint8(sample: np.ndarray) -> np.ndarray:
    """(1, 3, H, W) sample in [-1, 1] → (H, W, 3) uint8, as IF's ``output_type="pil"`` post-processing."""
    image = np.clip(sample[0].astype(np.float32) / 2 + 0.5, 0.0, 1.0)
    return (image.transpose(1, 2, 0) * 255).round().astype(np.uint8)


@dataclass(frozen=True)
class Stage:
    """One stage of the cascade, as the export recorded it."""

    number: int
    unet: str  # the manifest's component
    sample_size: int
    in_channels: int  # stage II: 3 for the sample + 3 for the upscaled image
    guidance: float
    scheduler: dict
    default_steps: int | None = None
    noise_level: int | None = None
    image_noising_scheduler: dict | None = None

    @property
    def channels(self) -> int:
        """The sample's channels (stage II's UNet takes the upscaled image beside it)."""
        return self.in_channels // 2 if self.image_noising_scheduler is not None else self.in_channels

    @classmethod
    def of(cls, entry: dict, folder: Path) -> Stage:
        """The manifest's stage entry; its schedulers are read from the folders it names."""
        noising = entry.get("image_noising_scheduler")
        return cls(
            number=int(entry["stage"]),
            unet=entry["unet"],
            sample_size=int(entry["sample_size"]),
            in_channels=int(entry["in_channels"]),
            guidance=float(entry["guidance"]),
            scheduler=read_scheduler(folder / entry["scheduler"]),
            default_steps=entry.get("default_steps"),
            noise_level=entry.get("noise_level"),
            image_noising_scheduler=read_scheduler(folder / noising) if noising else None,
        )


@dataclass(frozen=True)
class UpscaleStage:
    """Stage III, the SD x4 upscaler, as the export recorded it: its components, constants and schedulers."""

    number: int
    unet: str
    text_encoder: str
    tokenizer: str  # its folder in the export
    vae_decoder: str
    in_channels: int  # 4 latent + 3 image
    latent_channels: int
    guidance: float
    noise_level: int
    max_noise_level: int
    default_steps: int
    vae_scale_factor: int  # 4: the output is 4x the input image
    vae: dict  # engine.vae.Vae's and the memory estimate's fields (vae_scaling_factor, vae_block_out_channels, ...)
    scheduler: dict
    low_res_scheduler: dict

    @classmethod
    def of(cls, entry: dict, folder: Path) -> UpscaleStage:
        vae = {key: entry[key] for key in entry if key.startswith("vae_") and key != "vae_decoder"}
        return cls(
            number=int(entry["stage"]),
            unet=entry["unet"],
            text_encoder=entry["text_encoder"],
            tokenizer=entry["tokenizer"],
            vae_decoder=entry["vae_decoder"],
            in_channels=int(entry["in_channels"]),
            latent_channels=int(entry["latent_channels"]),
            guidance=float(entry["guidance"]),
            noise_level=int(entry["noise_level"]),
            max_noise_level=int(entry["max_noise_level"]),
            default_steps=int(entry["default_steps"]),
            vae_scale_factor=int(entry["vae_scale_factor"]),
            vae=vae,
            scheduler=read_scheduler(folder / entry["scheduler"]),
            low_res_scheduler=read_scheduler(folder / entry["low_res_scheduler"]),
        )


def upscaler_image(image: np.ndarray, scale_factor: int) -> np.ndarray:
    """``VaeImageProcessor.preprocess`` of an (N, 3, h, w) float tensor, as StableDiffusionUpscalePipeline runs it
    on IF stage II's raw sample: a tensor with values below 0 is taken as [-1, 1] and kept; one in [0, 1] is
    normalised to ``2x - 1``. Its sides must be multiples of the VAE's factor (it would resize them)."""
    image = np.asarray(image, dtype=np.float32)
    if image.shape[-1] % scale_factor or image.shape[-2] % scale_factor:
        raise EngineError(
            f"stage III takes an image whose sides are multiples of {scale_factor}; got "
            f"{image.shape[-1]}x{image.shape[-2]}: pick a stage I size that is a multiple of 8"
        )
    return image if image.min() < 0 else (np.float32(2.0) * image - np.float32(1.0)).astype(np.float32)


class DeepFloydIFArchitecture(Architecture):
    components = {"text_encoder": True, "unet": True, "unet_2": True}
    denoiser_component = "unet"
    t5_component = "text_encoder"

    def __init__(self, manifest):
        super().__init__(manifest)
        folder = Path(manifest.folder)
        entries = self.config.get("stages") or ()
        # stages I and II sample pixels; stage III (the x4 upscaler, when exported) latents through its VAE
        self.stages = [Stage.of(e, folder) for e in entries if e.get("pipeline_class") != UPSCALE_PIPELINE]
        upscalers = [UpscaleStage.of(e, folder) for e in entries if e.get("pipeline_class") == UPSCALE_PIPELINE]
        self.stage_3 = upscalers[0] if upscalers else None
        self.vae_scale_factor = 1  # pixel space

    def tokenizer_lengths(self) -> dict[str, int]:
        return {"tokenizer": int(self.config.get("max_sequence_length") or MAX_SEQUENCE_LENGTH)}

    # --- conditioning
    def encode(self, graphs, tokenizers, prompt, negative, guidance):
        """→ {"embeds": (2, 77, D) [negative, prompt] with CFG, else (1, 77, D)}: shared by every stage."""
        encoder = TextEncoder(graphs["text_encoder"], tokenizers["tokenizer"])
        warnings: list[str] = []
        (out,) = encode_text([encoder], preprocess_text(prompt), warnings)
        embeds = out.last_hidden
        if self.uses_cfg(guidance):
            (neg,) = encode_text([encoder], preprocess_text(negative), warnings)
            embeds = np.concatenate([neg.last_hidden, embeds])
        return {"embeds": embeds.astype(np.float32)}, warnings

    # --- each stage
    def stage_size(self, stage: Stage, width: int, height: int) -> tuple[int, int]:
        """The stage's (width, height): stage I the asked size, a later stage that size times its upscale factor
        (IF-II-L: 64 → 256, diffusers' default for a square image)."""
        factor = stage.sample_size / self.stages[0].sample_size
        return int(round(width * factor)), int(round(height * factor))

    def noised_image(self, stage: Stage, image: np.ndarray, width: int, height: int, noise: np.ndarray, sched):
        """The previous stage's image upscaled to this stage's size and noised to its noise level."""
        upscaled = upscale_bilinear(image, height, width)
        return sched.add_noise(upscaled, noise, np.array([stage.noise_level], dtype=np.int64))

    def stage_denoiser(self, graph, stage: Stage, cond: dict, guidance: float, image: np.ndarray | None = None):
        """The stage's UNet as ``denoise(x, t)`` → the guided 6-channel output DDPM steps with."""
        embeds = cond["embeds"]
        cfg = self.uses_cfg(guidance)
        if not cfg:  # encoded with the negative prompt for the other stage's guidance: the prompt's states alone
            embeds = embeds[-1:]
        batch = embeds.shape[0]
        extra = {}
        if image is not None:
            extra["class_labels"] = np.full((batch,), stage.noise_level, dtype=np.int64)

        def denoise(x, t):
            sample = x if image is None else np.concatenate([x, image], axis=1)
            sample = np.concatenate([sample] * batch) if cfg else sample
            out = graph(
                outputs=["out_sample"],
                sample=sample,
                timestep=self.timestep(t, batch),
                encoder_hidden_states=embeds,
                **extra,
            )["out_sample"]
            return guided_noise(out, stage.channels, guidance) if cfg else out

        return denoise

    # --- stage III: the x4 upscaler
    def encode_stage_3(self, graph, tokenizer, prompt: str, negative: str, guidance: float):
        """StableDiffusionUpscalePipeline.encode_prompt: CLIP's last hidden states of the prompt as given (CLIP's
        tokenizer lowercases it), with the negative prompt's before them under CFG."""
        encoder = TextEncoder(graph, tokenizer)
        warnings: list[str] = []
        (out,) = encode_text([encoder], prompt, warnings)
        embeds = out.last_hidden
        if self.uses_cfg(guidance):
            (neg,) = encode_text([encoder], negative, warnings)
            embeds = np.concatenate([neg.last_hidden, embeds])
        return embeds.astype(np.float32), warnings

    def upscale_denoiser(self, graph, stage: UpscaleStage, embeds: np.ndarray, image: np.ndarray, guidance: float):
        """The upscaler's UNet as ``denoise(x, t)``: [latents, noised image] on channels, the noise level as
        ``class_labels``, CFG on the whole output (4 channels: no learned variance)."""
        batch = embeds.shape[0]
        cfg = batch == 2
        image_in = np.concatenate([image] * batch)
        class_labels = np.full((batch,), stage.noise_level, dtype=np.int64)

        def denoise(x, t):
            sample = np.concatenate([x] * batch) if cfg else x
            out = graph(
                outputs=["out_sample"],
                sample=np.concatenate([sample, image_in], axis=1),
                timestep=self.timestep(t, batch),
                encoder_hidden_states=embeds,
                class_labels=class_labels,
            )["out_sample"]
            return classifier_free_guidance(out, guidance) if cfg else out

        return denoise
