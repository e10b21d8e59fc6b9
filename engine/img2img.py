"""Image-to-image and inpainting: where sampling starts from an encoded image instead of pure noise.

Follows diffusers' img2img and inpaint pipelines (StableDiffusion[XL]Img2Img/Inpaint, StableDiffusion3Img2Img,
FluxImg2Img/Inpaint): the image is resized and normalised as their ``VaeImageProcessor`` does, encoded by
the VAE and sampled from its latent distribution, noised to the first timestep of the schedule's tail
(``strength``), and — inpainting — blended back outside the mask after every step (4-channel UNets and
transformers) or handed to a 9-channel inpainting UNet beside the latents. Random draws are made in the
order the pipelines call ``randn_tensor``, from the one generator of the generation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import registry

from . import images
from .errors import EngineError


@dataclass(frozen=True)
class StartImage:
    image: object  # PIL.Image, RGB
    mask: object | None  # PIL.Image or None; white is repainted
    strength: float
    width: int
    height: int

    @staticmethod
    def check(image, mask, strength, pipeline, width, height) -> StartImage | None:
        """Validate the image inputs before anything runs; None for plain text-to-image."""
        if image is None:
            if mask is not None:
                raise EngineError("--mask needs --image: the mask says which part of an image to repaint")
            if strength is not None:
                raise EngineError("--strength needs --image: it says how much of the image to repaint")
            return None
        if not pipeline.has_image_encoder:
            raise EngineError(
                f"{pipeline.model_label} was exported without its VAE encoder (vae_encoder), which image-to-image "
                f"needs; export the model again"
            )
        arch = pipeline.architecture
        if strength is None:  # the family's diffusers pipeline's default (registry data)
            strength = registry.family(pipeline.manifest.family).default_strength(inpaint=mask is not None)
        strength = float(strength)
        if not (0.0 < strength <= 1.0) or not np.isfinite(strength):
            raise EngineError(f"--strength must be in (0, 1] (got {strength}); 1 repaints everything")
        if mask is not None and mask.size != image.size:
            raise EngineError(
                f"the mask is {mask.size[0]}x{mask.size[1]} but the image is {image.size[0]}x{image.size[1]}; "
                f"give a mask of the image's size"
            )
        factor = arch.image_scale_factor
        default_w, default_h = images.default_size(image.size[0], image.size[1], factor)
        width = default_w if width is None else width
        height = default_h if height is None else height
        if width < factor or height < factor:
            raise EngineError(f"the image is {image.size[0]}x{image.size[1]}: at least {factor}x{factor} is needed")
        return StartImage(image, mask, strength, width, height)

    def prepare(self, pipeline, encoder, sched, start: int, cond: dict, guidance: float, latents, rng):
        """→ (the packed starting latents, the conditioning (an inpainting UNet's inputs added), the
        per-step blend or None)."""
        arch, vae = pipeline.architecture, pipeline.vae
        shape = arch.latent_shape(self.width, self.height)
        pixels = images.preprocess_image(self.image, self.width, self.height, vae_scale_factor=arch.image_scale_factor)
        t_start = sched.timesteps[start]
        if self.mask is None:
            image_latents = vae.encode(encoder, pixels, rng)
            noise = pipeline._noise(shape, latents, rng)
            return arch.pack(sched.noise_sample(image_latents, noise, t_start)), cond, None
        return self._inpaint(pipeline, encoder, sched, start, cond, guidance, latents, rng, pixels, shape)

    def _inpaint(self, pipeline, encoder, sched, start, cond, guidance, latents, rng, pixels, shape):
        arch, vae = pipeline.architecture, pipeline.vae
        full = self.strength == 1.0
        image_latents = None
        if not arch.inpainting or not full:  # the inpaint pipelines encode the image only when they use it
            image_latents = vae.encode(encoder, pixels, rng)
        noise = pipeline._noise(shape, latents, rng)
        if full:
            x = noise * np.float32(sched.init_noise_sigma)
        else:
            x = sched.noise_sample(image_latents, noise, sched.timesteps[start])
        mask = images.preprocess_mask(self.mask, self.width, self.height, vae_scale_factor=arch.image_scale_factor)
        masked_pixels = images.masked_image(pixels, mask)
        latent_mask = images.mask_to_latents(mask, shape[2], shape[3])
        # drawn by every inpaint pipeline, used only by a 9-channel UNet: the draw keeps the generator's order
        masked_latents = vae.encode(encoder, masked_pixels.astype(np.float32), rng)
        if arch.inpainting:
            batch = cond["embeds"].shape[0]
            inputs = (np.concatenate([latent_mask] * batch), np.concatenate([masked_latents] * batch))
            cond = {**cond, "inpaint": inputs}
            return arch.pack(x), cond, None
        timesteps = sched.timesteps[start:]
        packed_image, packed_noise = arch.pack(image_latents), arch.pack(noise)
        packed_mask = arch.pack_mask(latent_mask)

        def blend(i: int, x: np.ndarray) -> np.ndarray:
            proper = packed_image
            if i < len(timesteps) - 1:  # re-noised to the next step's level; the last step keeps the clean image
                proper = sched.noise_sample(packed_image, packed_noise, timesteps[i + 1])
            return (1 - packed_mask) * proper + packed_mask * x

        return arch.pack(x), cond, blend
