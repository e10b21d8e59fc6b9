"""Qwen-Image: a flow-matching MMDiT over packed 2x2 latent patches, conditioned on Qwen2.5-VL's last hidden
states, with true classifier-free guidance.

As diffusers 0.39's QwenImagePipeline does it:
- the prompt (and, with CFG, the negative prompt, " " when none is given) is encoded alone, in the pipeline's
  chat template with its first ``prompt_template_start_idx`` tokens dropped, cut to ``max_sequence_length``;
- the two texts differ in length, so the transformer runs twice per step, batch 1 each, the prompt first;
- the guided prediction is rescaled to the conditional one's norm (per token, over the channels);
- rotary tables are QwenEmbedRope's complex tables, fed as their real and imaginary parts;
- sigmas linspace(1, 1/N) shifted by a `mu` that grows with the number of image tokens (FLUX's rule, with
  the scheduler config's bounds), timesteps fed as t / 1000;
- latents (1, z_dim, 2*(H//16), 2*(W//16)) packed into 2x2 patches exactly as FLUX packs them.
"""

from __future__ import annotations

import numpy as np

import schedulers

from .. import text_encoders
from .base import Architecture, encode_text
from .flux import FluxArchitecture

# QwenImagePipeline.__init__'s constants, for a manifest that does not record them
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
PROMPT_TEMPLATE_START_IDX = 34
TOKENIZER_MAX_LENGTH = 1024
MAX_SEQUENCE_LENGTH = 512
#: QwenEmbedRope's tables hold this many positions (and as many negative ones)
ROPE_POSITIONS = 4096


def rope_angles(index: np.ndarray, dim: int, theta: float) -> np.ndarray:
    """QwenEmbedRope.rope_params' angles in float32 as torch computes them:
    ``torch.outer(index, 1.0 / torch.pow(theta, torch.arange(0, dim, 2).float().div(dim)))``.

    The float32 power is the float64 one rounded (torch's float32 pow is correctly rounded here), so the
    inverse frequencies, and hence every angle, are torch's to the bit."""
    if dim % 2:
        raise ValueError(f"rotary axis dimension {dim} is odd")
    exponent = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
    power = (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)
    inverse = np.float32(1.0) / power
    return np.outer(np.asarray(index).astype(np.float32), inverse).astype(np.float32)


def _polar(angles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of float32 angles, correctly rounded to float32 (torch.polar's within an ulp)."""
    wide = angles.astype(np.float64)
    return np.cos(wide).astype(np.float32), np.sin(wide).astype(np.float32)


def rotary_tables(
    height: int, width: int, text_len: int, axes_dims, theta: float = 10000, scale_rope: bool = True
) -> dict[str, np.ndarray]:
    """QwenEmbedRope(theta, axes_dims, scale_rope)([(1, height, width)], max_txt_seq_len=text_len) for one frame
    of a ``height`` x ``width`` grid of packed tokens, as ``img_freqs_cos/sin`` (height*width, sum(axes)/2) and
    ``txt_freqs_cos/sin`` (text_len, sum(axes)/2): the complex tables' real and imaginary parts."""
    frame_dim, height_dim, width_dim = (int(d) for d in axes_dims)
    if scale_rope:  # centred: the negative table's last (n - n//2) positions, then the positive table's first n//2
        rows = np.arange(height) - (height - height // 2)
        cols = np.arange(width) - (width - width // 2)
        text_start = max(height // 2, width // 2)
    else:
        rows, cols = np.arange(height), np.arange(width)
        text_start = max(height, width)
    frame = np.broadcast_to(rope_angles(np.zeros(1), frame_dim, theta)[None], (height, width, frame_dim // 2))
    rows_angles = np.broadcast_to(rope_angles(rows, height_dim, theta)[:, None], (height, width, height_dim // 2))
    cols_angles = np.broadcast_to(rope_angles(cols, width_dim, theta)[None, :], (height, width, width_dim // 2))
    image = np.concatenate([frame, rows_angles, cols_angles], axis=-1).reshape(height * width, -1)
    # the text continues the positive table after the image's largest position, on every axis alike;
    # the table ends at ROPE_POSITIONS, as torch's slice of it does
    positions = np.arange(text_start, min(text_start + text_len, ROPE_POSITIONS))
    text = np.concatenate([rope_angles(positions, d, theta) for d in (frame_dim, height_dim, width_dim)], axis=-1)
    img_cos, img_sin = _polar(image)
    txt_cos, txt_sin = _polar(text)
    return {"img_freqs_cos": img_cos, "img_freqs_sin": img_sin, "txt_freqs_cos": txt_cos, "txt_freqs_sin": txt_sin}


def true_cfg(cond: np.ndarray, uncond: np.ndarray, scale: float) -> np.ndarray:
    """QwenImagePipeline's guidance: the guided prediction rescaled, token by token, to the conditional one's norm."""
    cond = cond.astype(np.float32, copy=False)
    uncond = uncond.astype(np.float32, copy=False)
    comb = uncond + np.float32(scale) * (cond - uncond)
    cond_norm = np.linalg.norm(cond, axis=-1, keepdims=True).astype(np.float32)
    comb_norm = np.linalg.norm(comb, axis=-1, keepdims=True).astype(np.float32)
    return comb * (cond_norm / comb_norm)


class QwenImageArchitecture(Architecture):
    components = {"text_encoder": True, "transformer": True}
    denoiser_component = "transformer"

    # the latents are packed into 2x2 patches as FLUX packs them (QwenImagePipeline's _pack_latents is FLUX's)
    image_scale_factor = FluxArchitecture.image_scale_factor
    latent_shape = FluxArchitecture.latent_shape
    pack = FluxArchitecture.pack
    pack_mask = FluxArchitecture.pack_mask
    unpack = FluxArchitecture.unpack

    def __init__(self, manifest):
        super().__init__(manifest)
        config = self.config
        self.axes_dims = [int(d) for d in config.get("axes_dims_rope") or (16, 56, 56)]
        self.rope_theta = float(config.get("rope_theta") or 10000)
        scale_rope = config.get("scale_rope")
        self.scale_rope = True if scale_rope is None else bool(scale_rope)
        self.prompt_template = config.get("prompt_template") or PROMPT_TEMPLATE
        start = config.get("prompt_template_start_idx")
        self.prompt_template_start = PROMPT_TEMPLATE_START_IDX if start is None else int(start)
        # the pipeline's window (QwenImagePipeline.tokenizer_max_length), not the tokenizer's own 131072
        self.tokenizer_max_length = int(config.get("pipeline_tokenizer_max_length") or TOKENIZER_MAX_LENGTH)
        self.max_sequence_length = int(config.get("max_sequence_length") or MAX_SEQUENCE_LENGTH)

    pad_prompts = False  # each prompt is tokenized alone with padding=True: nothing is padded

    def tokenizer_lengths(self) -> dict[str, int]:
        # diffusers tokenizes the templated prompt with max_length = tokenizer_max_length + the dropped prefix
        return {"tokenizer": self.tokenizer_max_length + self.prompt_template_start}

    def negative_prompt_used(self, negative: str, guidance: float) -> str:
        # true CFG needs a negative prompt in diffusers: " " when none is given, as its docs suggest
        return (negative or " ") if self.uses_cfg(guidance) else negative

    def denoiser_batch(self, guidance) -> int:
        return 1  # with CFG the transformer runs twice, batch 1 each: the memory plan counts one

    # --- conditioning
    def _encoder(self, graphs, tokenizers):
        return text_encoders.QwenTextEncoder(
            graphs["text_encoder"],
            tokenizers["tokenizer"],
            self.prompt_template,
            self.prompt_template_start,
            self.max_sequence_length,
        )

    def _encode_one(self, encoder, text: str, warnings: list[str]) -> np.ndarray:
        (out,) = encode_text([encoder], text, warnings)
        return np.asarray(out.last_hidden, dtype=np.float32)

    def encode(self, graphs, tokenizers, prompt, negative, guidance):
        """→ {"embeds": (1, S, D)} and, with CFG, "negative_embeds": (1, S', D): each text encoded alone."""
        encoder = self._encoder(graphs, tokenizers)
        warnings: list[str] = []
        cond = {"embeds": self._encode_one(encoder, prompt, warnings)}
        if self.uses_cfg(guidance):
            cond["negative_embeds"] = self._encode_one(encoder, self.negative_prompt_used(negative, guidance), warnings)
        return cond, warnings

    # --- schedule
    def image_tokens(self, width: int, height: int) -> tuple[int, int]:
        """The packed grid: (rows, columns) of 2x2 latent patches."""
        _, _, h, w = self.latent_shape(width, height)
        return h // 2, w // 2

    def set_timesteps(self, scheduler, steps, width, height) -> None:
        rows, cols = self.image_tokens(width, height)
        cfg = scheduler.config
        mu = schedulers.calculate_shift(
            rows * cols,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)

    def rotary(self, width: int, height: int, text_len: int) -> dict[str, np.ndarray]:
        rows, cols = self.image_tokens(width, height)
        return rotary_tables(rows, cols, text_len, self.axes_dims, self.rope_theta, self.scale_rope)

    def prepare(self, cond, width, height, guidance) -> dict:
        """The transformer's rotary inputs for each text it runs with: {"cond": {...}, "uncond": {...}}."""
        extra = {"cond": self.rotary(width, height, cond["embeds"].shape[1])}
        if "negative_embeds" in cond:
            extra["uncond"] = self.rotary(width, height, cond["negative_embeds"].shape[1])
        return extra

    # --- the denoiser
    def cache_contexts(self, cond) -> tuple[str, ...]:
        # QwenImagePipeline runs the prompt in cache_context("cond"), the negative in cache_context("uncond")
        return ("cond", "uncond") if "negative_embeds" in cond else ("cond",)

    def context_count(self, guidance) -> int:
        return 2 if guidance is None or self.uses_cfg(guidance) else 1  # the negative is encoded with CFG only

    def denoiser(self, graph, cond, extra, guidance):
        def run(x, t, embeds, rotary):
            return graph(
                outputs=["out_hidden_states"],
                hidden_states=x,
                timestep=self.timestep(t, x.shape[0]),
                encoder_hidden_states=embeds,
                **rotary,
            )["out_hidden_states"]

        guided = "negative_embeds" in cond

        def denoise(x, t):
            out = run(x, t, cond["embeds"], extra["cond"])
            if not guided:
                return out
            negative = run(x, t, cond["negative_embeds"], extra["uncond"])
            return true_cfg(out, negative, guidance)

        return denoise
