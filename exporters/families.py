"""Which diffusers pipeline class is which Stepwise family: data, read by the source loaders."""

from __future__ import annotations

# model_index.json `_class_name` -> registry family: data the engine needs too, so it lives in the registry
from registry.pipelines import PIPELINE_FAMILIES, family_of  # noqa: F401

# pipeline classes that are a cascade's later stage: exported with its first stage (--stage-2), not alone
LATER_STAGES = ("IFSuperResolutionPipeline", "StableDiffusionUpscalePipeline")

# tiny:<name> -> (registry family, the registry model whose scheduler config the tiny pipeline copies,
#                 the diffusers pipeline class it builds)
TINY_SOURCES: dict[str, tuple[str, str, str]] = {
    "sd15": ("sd15", "sd15", "StableDiffusionPipeline"),
    "sdxl": ("sdxl", "sdxl", "StableDiffusionXLPipeline"),
    "lcm": ("sd15", "lcm", "LatentConsistencyModelPipeline"),
    "sd15-inpaint": ("sd15", "sd15", "StableDiffusionInpaintPipeline"),
    "sd3": ("sd3", "sd3-medium", "StableDiffusion3Pipeline"),
    "flux-schnell": ("flux", "flux-schnell", "FluxPipeline"),
    "flux-dev": ("flux", "flux-dev", "FluxPipeline"),
    "qwen-image": ("qwen-image", "qwen-image", "QwenImagePipeline"),
    "hidream-i1": ("hidream", "hidream-i1", "HiDreamImagePipeline"),
    "hidream-i1-dev": ("hidream", "hidream-i1-dev", "HiDreamImagePipeline"),
    "hidream-i1-fast": ("hidream", "hidream-i1-fast", "HiDreamImagePipeline"),
    "deepfloyd-if": ("deepfloyd-if", "deepfloyd-if", "IFPipeline"),  # stage I, with its stage II (deepfloyd_if/)
}

# The pipeline attributes that become ONNX graphs, in export order (the VAE becomes two graphs).
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")  # _4: HiDream's Llama
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3", "tokenizer_4")
DENOISERS = ("unet", "transformer")
# Subfolders a checkpoint needs for export; everything else in a hub repo (safety checker, single-file
# checkpoints, fp16 variants, other frameworks' weights) is not downloaded.
NEEDED_FOLDERS = (
    "scheduler",
    *TOKENIZERS,
    *TEXT_ENCODERS,
    *DENOISERS,
    "vae",
    "image_noising_scheduler",  # IF's stage II
    "low_res_scheduler",  # the SD x4 upscaler (IF's stage III)
)
UNNEEDED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder", "watermarker")
