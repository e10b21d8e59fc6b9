"""How a model is held in memory while it runs, and refusing, before loading, a run that will not fit
(instead of letting the machine swap or the process be killed halfway through a generation).

Two load policies: ``resident`` keeps every session loaded (what a long-lived process wants, and the fastest
for several images); ``phased`` loads each phase's sessions (text encoders → image encoder → denoiser →
decoder) and releases them before the next, so the peak is the largest phase, not the sum.

The estimate is weights plus activations at the asked size. Activations are what ONNX Runtime's CPU arena
holds while a graph runs; each session keeps its own arena at its high-water mark until it is released, so
resident adds up every graph that runs and phased takes the largest phase. Per graph:

- attention that is not fused materialises its scores: MatMul → Softmax keeps two (batch, heads, tokens,
  tokens) float32 tensors alive (measured 2.02-2.08x one tensor: the tiny SD3/FLUX transformers, the VAE's
  mid-block attention). The UNet's attention, rewritten as MultiHeadAttention (exporters/optimize.py), never
  materialises them;
- convolutions and linear layers keep a few tensors of the widest activation alive (constants below,
  measured on the full-size SD 1.5 UNet and VAE with random weights, and the tiny models);
- two stages of one graph that do not overlap (the VAE's attention and its full-resolution convolutions)
  share the arena only when the later stage's tensors fit in the chunks the earlier one freed (the arena
  reuses a freed chunk only for a request that fits in it): the decoder's attention at 1024x1024 frees 1 GB
  chunks its convolutions reuse, the encoder's attention comes after its smaller convolutions and adds up.
"""

from __future__ import annotations

from dataclasses import dataclass

from registry.cache import TAYLOR_GRAPHS
from registry.machine import available_memory_mb

from .errors import EngineError
from .vae import Tiling, vae_layout

# Weights cost about their file size once loaded: the SD 1.5 UNet holds 3.31 GB after a run for 3.28 GB of fp32
# weights, 3.5 GB at its first load, which also writes the graph cache (docs/benchmarks.md), before any
# activation. Activations are estimated on top, per size (below).
WEIGHTS_FACTOR = 1.05
# 4-bit MatMulNBits weights cost more once loaded: ONNX Runtime repacks them for its int8-dot-product kernel. The
# full-size FLUX.1 int4 transformer (6.07 GB file) held 7.4-7.7 GB (docs/benchmarks.md, "Big models at full
# size"); int8 ones (T5-XXL, 4.94 GiB) held about their file size.
INT4_WEIGHTS_FACTOR = 1.25
OVERHEAD_MB = 200.0  # the interpreter, onnxruntime, tokenizers, numpy (the CLI on a tiny model peaks at 135-150 MB)
MB = 2**20
FLOAT = 4

# Full-size tensors alive at once, measured with ONNX Runtime 1.32 (arena on, memory pattern off):
UNET_BUFFERS = 28  # of (batch, first block's channels, h, w): SD 1.5 26-27 at 512-768 (batch 2), tiny 15-18
TRANSFORMER_BUFFERS = 24  # of (batch, tokens, hidden size): the tiny SD3/FLUX transformers ~20, besides attention
VAE_DECODER_BUFFERS = 3.5  # of (1, block_out_channels[1], H, W): SD 1.5 3.2-3.6 at 512-768 (4.0 before reuse)
VAE_ENCODER_BUFFERS = 4.0  # of (1, block_out_channels[0], H, W): SD 1.5 2.9 at 512, 4.0 at 1024
TEXT_BUFFERS = 16  # of (1, tokens, hidden size); text encoders are small next to the rest
ATTENTION_COPIES = 2.1  # score tensors alive at once: MatMul's and Softmax's (measured 2.02-2.08x one)
HOST_IMAGE_COPIES = 4  # float32 (3, H, W) copies numpy makes around the VAE (decode, clip, transpose, tiles)
# TaylorSeer's arrays per attention output (engine/cache.py) at max_order=1, the default: its two factors, a
# call's outputs and, while a computed call updates them, the new difference; each order more adds one
TAYLOR_COPIES = 4

# An export without ``denoiser_attention`` (before it was recorded): the real models' largest values
FALLBACK_ATTENTION = {
    "unet": {"stride": 1, "heads": 8, "joint_tokens": 0, "width": 320},  # SD 1.5 (SDXL: stride 2, 10 heads)
    "transformer": {"stride": 2, "heads": 38, "joint_tokens": 589, "width": 2432},  # SD 3.5 Large / FLUX-dev
}

RESIDENT, PHASED = "resident", "phased"
POLICIES = (RESIDENT, PHASED)


def weights_mb(manifest, components) -> float:
    return sum(_weights_bytes(manifest, name) / MB * _weights_factor(manifest, name) for name in components)


def _weights_bytes(manifest, name: str) -> int:
    """The graph's bytes that become resident. ONNX Runtime maps the page-aligned data file, so a token
    embedding table (a Gather's, bf16: Qwen2.5-VL's 1.1 GB) costs only the rows a prompt looks up; measured
    on Qwen2.5-VL at full width, one and two layers: the text phase held ~0.8 GB of a 1.3 GB file."""
    entry = manifest.components.get(name) or {}
    lookup = int((entry.get("weights") or {}).get("bf16_embedding_bytes") or 0)
    # a graph reading part of another's data file (TaylorSeer's predict graph: no attention weights)
    unread = entry["data_bytes"] - entry["data_read_bytes"] if "data_read_bytes" in entry else 0
    return max(manifest.weights_bytes([name]) - lookup - unread, 0)


def _weights_factor(manifest, name: str) -> float:
    entry = manifest.components.get(name) or {}
    fmt = (entry.get("weights") or {}).get("format")
    return INT4_WEIGHTS_FACTOR if fmt == "int4" else WEIGHTS_FACTOR


def estimate_mb(manifest, components) -> float:
    """Weights and overhead only (no activations): what a set of sessions costs before it runs."""
    return weights_mb(manifest, components) + OVERHEAD_MB


# --- activations ------------------------------------------------------------------------------------------


def _attention_mb(batch: int, heads: int, tokens: int) -> float:
    """Scores and their softmax, alive together."""
    return ATTENTION_COPIES * batch * heads * tokens**2 * FLOAT / MB


def _stages(first: tuple[float, float], second: tuple[float, float]) -> float:
    """The arena's peak for two stages run one after the other, each (MB alive, largest tensor in MB)."""
    (total1, largest1), (total2, largest2) = first, second
    return max(total1, total2) if largest2 <= largest1 else total1 + total2


def _config(manifest) -> dict:
    return getattr(manifest, "config", None) or {}


def _scale_factor(manifest) -> int:
    return int(_config(manifest).get("vae_scale_factor") or 8)


def _fused(manifest, name: str) -> bool:
    fusion = manifest.components.get(name, {}).get("fusion") or {}
    return bool(fusion.get("multi_head_attention"))


def _vae_mb(
    manifest, encoder: bool, width: int, height: int, tiling: Tiling | None, layout: dict | None, scale_factor=None
) -> float:
    layout = layout or vae_layout(manifest)
    f = scale_factor or _scale_factor(manifest)
    channels = layout["block_out_channels"]
    host = HOST_IMAGE_COPIES * 3 * width * height * FLOAT / MB
    tiled = tiling is not None and (width > tiling.sample_size or height > tiling.sample_size)
    if tiled:  # the graph runs on one tile at a time; numpy keeps every decoded tile until they are stitched
        stride = int(tiling.latent_size * (1 - tiling.overlap_factor)) * f
        tiles = -(-height // stride) * -(-width // stride)
        host += tiles * 3 * tiling.sample_size**2 * FLOAT / MB
        width, height = min(width, tiling.sample_size), min(height, tiling.sample_size)
    tokens = (height // f) * (width // f)
    scores = tokens**2 * FLOAT / MB if layout["mid_block_attention"] else 0.0
    attention = (ATTENTION_COPIES * scores, scores)
    if encoder:
        conv = width * height * channels[0] * FLOAT / MB
        return _stages((VAE_ENCODER_BUFFERS * conv, conv), attention) + host
    conv = width * height * channels[min(1, len(channels) - 1)] * FLOAT / MB
    return _stages(attention, (VAE_DECODER_BUFFERS * conv, conv)) + host


def _denoiser_mb(manifest, name: str, width: int, height: int, batch: int, contexts: int = 1) -> float:
    kind = "unet" if name.startswith("unet") else "transformer"  # unet_deep, unet_shallow: a UNet's parts
    # a cascade's later UNets (unet_2: DeepFloyd IF's stage II) have their own layout (denoiser_attention_2)
    stage = name[len("unet") :] if kind == "unet" and name[len("unet_") :].isdigit() else ""
    layout = {**FALLBACK_ATTENTION[kind], **(_config(manifest).get("denoiser_attention" + stage) or {})}
    f = _scale_factor(manifest)
    h, w = height // f, width // f
    stride = layout["stride"]
    tokens = (h // stride) * (w // stride) + layout["joint_tokens"] if stride else 0
    max_seq = _config(manifest).get("max_seq")
    if stride and max_seq and h != w:  # HiDream pads a non-square latent's tokens to max_seq
        tokens = int(max_seq) + layout["joint_tokens"]
    if kind == "unet":
        linear = UNET_BUFFERS * batch * h * w * layout["width"] * FLOAT / MB
    else:
        linear = TRANSFORMER_BUFFERS * batch * tokens * layout["width"] * FLOAT / MB
    attention = 0.0 if _fused(manifest, name) or not stride else _attention_mb(batch, layout["heads"], tokens)
    factors = _taylor_factors_mb(manifest, name, batch * contexts, tokens, layout["width"])
    return linear + attention + factors


def _taylor_factors_mb(manifest, name: str, batch: int, tokens: int, width: int) -> float:
    """TaylorSeer's numpy arrays beside the record graph (counted with it): each hooked attention module's
    outputs span the tokens once (a joint block's image and text outputs, a single block's one over both);
    ``batch``: the rows of every context's factors together (Qwen-Image's CFG contexts keep one set each)."""
    if name != TAYLOR_GRAPHS[0]:
        return 0.0
    outputs = (manifest.components.get(name) or {}).get("outputs") or {}
    modules = {output.rsplit(".output_", 1)[0] for output in outputs if ".output_" in output}
    return TAYLOR_COPIES * len(modules) * batch * tokens * width * FLOAT / MB


def _text_mb(manifest, name: str) -> float:
    config = _config(manifest)
    hidden = int((config.get("text_encoder_hidden_size") or {}).get(name) or 4096)
    tokens = max(77, int(config.get("max_sequence_length") or 0))
    return _attention_mb(1, max(1, hidden // 64), tokens) + TEXT_BUFFERS * tokens * hidden * FLOAT / MB


def activation_mb(
    manifest,
    name: str,
    width: int,
    height: int,
    *,
    batch: int = 2,
    tiling: Tiling | None = None,
    vae=None,
    scale_factor: int | None = None,
    contexts: int = 1,
) -> float:
    """What running component ``name`` once at ``width`` x ``height`` adds to the process, in MB: its arena's
    high-water mark (and the numpy arrays around the VAE). ``batch``: the denoiser's (2 with classifier-free
    guidance); ``tiling``: the VAE runs in these tiles; ``vae``: ``vae_layout(manifest)`` when known;
    ``scale_factor``: the VAE's, when not the export's (a cascade's stage III: vae_decoder_3, x4);
    ``contexts``: the denoiser's calls a step that a step cache keeps a state for each (engine/cache.py
    PerContext: Qwen-Image's true CFG, 2)."""
    if name.startswith("text_encoder"):
        return _text_mb(manifest, name)
    if name.startswith(("vae_decoder", "vae_encoder")):
        return _vae_mb(manifest, name.startswith("vae_encoder"), width, height, tiling, vae, scale_factor)
    return _denoiser_mb(manifest, name, width, height, batch, contexts)


# --- the plan ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    policy: str
    need_mb: float  # the estimated peak of the chosen policy
    resident_mb: float
    phased_mb: float
    available_mb: float | None
    reason: str
    width: int | None = None
    height: int | None = None
    vae_tiling: bool = False  # the VAE decodes (and encodes) in tiles
    untiled_mb: float | None = None  # the chosen policy's need without tiles, when tiles were chosen to fit
    tile: int | None = None  # the tile size in pixels
    decoded: tuple[int, int] | None = None  # what the VAE decodes when not width x height (IF's stage III: 16x)

    def describe(self) -> str:
        """The plan's ``Memory:`` line."""
        size = f" at {self.width}x{self.height}" if self.width else ""
        line = f"{self.policy}, ~{self.need_mb:,.0f} MB{size} ({self.reason})"
        if self.vae_tiling and self.width and max(self.decoded or (self.width, self.height)) <= self.tile:
            line += f"; VAE tiles of {self.tile}x{self.tile}: the image is one tile"
        elif self.vae_tiling:
            why = f"untiled ~{self.untiled_mb:,.0f} MB" if self.untiled_mb else "--vae-tiling"
            line += f"; VAE in {self.tile}x{self.tile} tiles ({why})"
        return line


@dataclass(frozen=True)
class _Need:
    resident: float
    phased: float

    def of(self, policy: str) -> float:
        return self.resident if policy == RESIDENT else self.phased


def _need(manifest, phases, width, height, batch, image, tiling, vae, contexts=1) -> _Need:
    running = {name: phase != "image" or image for phase, names in phases.items() for name in names}
    options = dict(batch=batch, tiling=tiling, vae=vae, contexts=contexts)
    act = {name: activation_mb(manifest, name, width, height, **options) if on else 0.0 for name, on in running.items()}
    resident = OVERHEAD_MB + weights_mb(manifest, list(running)) + sum(act.values())
    phased = max(
        (
            OVERHEAD_MB + weights_mb(manifest, names) + sum(act[n] for n in names)
            for phase, names in phases.items()
            if names and (phase != "image" or image)
        ),
        default=OVERHEAD_MB,
    )
    return _Need(resident, phased)


def _default_size(manifest) -> tuple[int, int]:
    size = int(_config(manifest).get("default_image_size") or 512)
    return size, size


def _size_multiple(manifest) -> tuple[int, int]:
    """The family's size multiple and smallest size (registry data); the VAE's factor when unknown."""
    try:
        import registry

        family = registry.family(manifest.family)
        return int(family.size_multiple), int(family.min_size)
    except Exception:  # noqa: BLE001 - a test double or an unknown family: the VAE's factor is the multiple
        f = _scale_factor(manifest)
        return f, f


def _largest_fitting(fits, width: int, height: int, multiple: int, smallest: int) -> tuple[int, int] | None:
    """The largest size of the asked shape, in multiples of ``multiple``, for which ``fits(w, h)``."""
    for w in range(width - width % multiple, smallest - 1, -multiple):
        h = max(smallest, int(height * w / width) // multiple * multiple)
        if (w, h) != (width, height) and fits(w, h):
            return w, h
    return None


def plan_memory(
    manifest,
    phases: dict[str, list[str]],
    policy: str | None = None,
    available_mb=None,
    *,
    width: int | None = None,
    height: int | None = None,
    batch: int = 2,
    image: bool = False,
    vae_tiling: bool | None = None,
    contexts: int = 1,
) -> MemoryPlan:
    """Choose the policy and whether the VAE runs in tiles for one generation at ``width`` x ``height``
    (default: the model's size) with the denoiser's ``batch`` (2 with classifier-free guidance) and, with
    ``image``, the VAE encoder; refuse one that fits under none. ``phases`` maps phase → its components;
    ``contexts``: the denoiser's calls a step (activation_mb).

    ``policy`` None: resident when the whole model fits, else phased when its largest phase does.
    ``vae_tiling`` None: tiles only when nothing fits without them; True: always; False: never. Without
    tiles the image is diffusers' untiled decode, so tiles come last."""
    if policy not in (None, *POLICIES):
        raise EngineError(f"unknown load policy {policy!r}; use one of {', '.join(POLICIES)}")
    if width is None or height is None:
        width, height = _default_size(manifest)
    have = available_mb if available_mb is not None else available_memory_mb()
    fits = (lambda need: True) if have is None else (lambda need: need <= have)
    tiling, vae = Tiling.of(manifest), vae_layout(manifest)
    policies = [policy] if policy else [RESIDENT, PHASED]
    tilings = {None: [False, True], True: [True], False: [False]}[vae_tiling]
    options = [(p, t) for t in tilings for p in policies]  # untiled before tiled, resident before phased

    def need(w, h, tiled):
        return _need(manifest, phases, w, h, batch, image, tiling if tiled else None, vae, contexts)

    needs = {t: need(width, height, t) for t in tilings}
    for chosen, tiled in options:
        if fits(needs[tiled].of(chosen)):
            break
    else:  # refused: said with the option that needs least
        chosen, tiled = min(options, key=lambda option: needs[option[1]].of(option[0]))
        _refuse(manifest, phases, needs[tiled], chosen, tiled, have, width, height, options, need, fits)
    est = needs[tiled]
    if policy == PHASED:
        reason = "asked for (--low-memory): each phase's sessions are released before the next"
    elif policy == RESIDENT:
        reason = "asked for"
    elif chosen == RESIDENT:
        reason = "the whole model fits in memory"
    else:
        reason = f"the whole model needs ~{est.resident:,.0f} MB, {have:,.0f} MB available; its largest phase fits"
    untiled = None
    if tiled and vae_tiling is None:
        untiled = needs[False].of(chosen)
    return MemoryPlan(
        chosen,
        est.of(chosen),
        est.resident,
        est.phased,
        have,
        reason,
        width=width,
        height=height,
        vae_tiling=tiled,
        untiled_mb=untiled,
        tile=tiling.sample_size,
    )


def _refuse(manifest, phases, est, chosen, tiled, have, width, height, options, need, fits):
    """One line: what was asked, what it needs, and what would fit (a smaller size, tiles, a policy)."""
    every = [name for names in phases.values() for name in names]
    multiple, smallest = _size_multiple(manifest)
    fixes = []
    untiled_options = [(p, t) for p, t in options if not t]
    tiled_options = [(p, t) for p, t in options if t]

    def fitting(opts):
        return _largest_fitting(
            lambda w, h: any(fits(need(w, h, t).of(p)) for p, t in opts), width, height, multiple, smallest
        )

    plain = fitting(untiled_options) if untiled_options else None
    with_tiles = fitting(tiled_options) if tiled_options else None
    if plain and with_tiles and with_tiles[0] > plain[0]:
        fixes.append(
            f"{plain[0]}x{plain[1]} or smaller, or up to {with_tiles[0]}x{with_tiles[1]} "
            f"with the VAE in tiles (--vae-tiling)"
        )
    elif plain or with_tiles:
        w, h = plain or with_tiles
        offer = not plain and bool(untiled_options)  # tiles help only if they are not on already
        fixes.append(f"{w}x{h} or smaller" + (" with the VAE in tiles (--vae-tiling)" if offer else ""))
    if chosen == RESIDENT and fits(est.phased):
        fixes.append("--low-memory (load one phase at a time)")
    if not (plain or with_tiles):  # no size helps: the weights themselves do not fit
        if any(name == "text_encoder_3" for name in every):
            fixes.append("--no-t5 (SD3 runs without its T5 encoder, as diffusers allows)")
        if manifest.data.get("precision", "fp32") == "fp32":
            fixes.append("an export with smaller weights when one exists for this model")
    fixes.append("closing other programs")
    how = chosen + (", the VAE in tiles" if tiled else "")
    raise EngineError(
        f"{manifest.folder.name} at {width}x{height} needs about {est.of(chosen):,.0f} MB of memory ({how}) "
        f"but {have:,.0f} MB is available; try {', or '.join(fixes)}"
    )
