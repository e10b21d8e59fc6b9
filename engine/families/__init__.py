"""Architecture-specific parts of the one denoising loop: conditioning, graph inputs, latent layout.

Everything else (the sampling loop, guidance arithmetic, VAE, PNG, profile) is shared in engine/.
Keyed by the registry's family name.
"""

from .base import Architecture
from .deepfloyd_if import DeepFloydIFArchitecture
from .flux import FluxArchitecture
from .hidream import HiDreamArchitecture
from .qwen_image import QwenImageArchitecture
from .sd3 import SD3Architecture
from .unet import UNetArchitecture

ARCHITECTURES: dict[str, type[Architecture]] = {
    "sd15": UNetArchitecture,
    "sdxl": UNetArchitecture,
    "sd3": SD3Architecture,
    "flux": FluxArchitecture,
    "qwen-image": QwenImageArchitecture,
    "hidream": HiDreamArchitecture,
    "deepfloyd-if": DeepFloydIFArchitecture,  # a pixel-space cascade: engine/cascade.py runs it
}

# families whose exports are cascades of pixel-space stages, loaded by engine.cascade.CascadePipeline
CASCADES = ("deepfloyd-if",)
