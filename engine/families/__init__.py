"""Family-specific parts of the one denoising loop: conditioning, graph inputs, latent layout.

Everything else (scheduler loop, guidance arithmetic, VAE, PNG, profile) is shared in engine/pipeline.py.
"""

from .flux import FluxFamily
from .sd3 import SD3Family
from .unet import UNetFamily

FAMILIES = {"sd15": UNetFamily, "sdxl": UNetFamily, "sd3": SD3Family, "flux": FluxFamily}
