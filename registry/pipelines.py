"""Facts of the diffusers pipelines Stepwise runs, as data: which pipeline class is which family, and the
prompt windows the pipelines use. Read by the exporters (a checkpoint's class) and by the manifest derived
for a foreign export (registry/derive.py)."""

from __future__ import annotations

# model_index.json `_class_name` -> registry family (registry/models.json "families")
PIPELINE_FAMILIES: dict[str, str] = {
    "StableDiffusionPipeline": "sd15",
    "StableDiffusionInpaintPipeline": "sd15",  # a 9-channel UNet (latents, mask, masked-image latents)
    "StableDiffusionXLPipeline": "sdxl",
    "LatentConsistencyModelPipeline": "sd15",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "QwenImagePipeline": "qwen-image",
    "HiDreamImagePipeline": "hidream",
    "IFPipeline": "deepfloyd-if",  # stage I; stage II (IFSuperResolutionPipeline) is exported with it
    "IFSuperResolutionPipeline": "deepfloyd-if",
    # the SD x4 upscaler: Stepwise runs it only as IF's optional stage III (--stage-3), exported with stage I
    "StableDiffusionUpscalePipeline": "deepfloyd-if",
}

# Pipelines that pass the tokenizer's attention mask to their text encoder (IF's T5; SD 3 and FLUX do not)
MASKED_TEXT_PIPELINES = ("IFPipeline", "IFSuperResolutionPipeline")

# T5 prompt length the pipelines are used with: SD3's default, FLUX-schnell's model card (256) and
# FLUX-dev's default (512). FLUX variants are told apart by guidance embedding.
T5_SEQUENCE_LENGTH: dict[str, int] = {"sd3": 256, "flux": 256, "flux-guidance": 512}

# Pipelines whose default image size is a constant of the class rather than the denoiser's sample_size
# (diffusers' FluxPipeline.default_sample_size), in latent pixels.
DEFAULT_SAMPLE_SIZE: dict[str, int] = {"FluxPipeline": 128, "QwenImagePipeline": 128, "HiDreamImagePipeline": 128}


def family_of(class_name: str | None) -> str | None:
    return PIPELINE_FAMILIES.get(class_name or "")
