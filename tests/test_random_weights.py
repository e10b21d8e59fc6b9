"""bench/random_weights.py: random pipelines written tensor by tensor as bf16 safetensors shards.

Checked against independent references: the folder ``save_pretrained`` writes for the same small config
(random_model.build), diffusers/transformers loading it (no missing or unexpected key), torch's own bf16
rounding of the documented values, safetensors reading the files, and a forward pass staying finite.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")

from bench import random_model, random_weights  # noqa: E402

SHARD = 200_000  # bytes: several shards per model at these sizes
CHUNK = 1000  # values per chunk: most tensors span several chunks


def _small(name: str) -> dict:
    """A real config (``configs/<name>.json``) cut to exporters/tiny.py's widths, keeping its reduced plan."""
    cfg = copy.deepcopy(random_model.config(name))
    clip = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, projection_dim=32)
    t5 = dict(vocab_size=192, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2, num_heads=4)
    t5.update(relative_attention_num_buckets=8, relative_attention_max_distance=32)
    vae = dict(block_out_channels=[32, 64], layers_per_block=1, sample_size=64)
    vae.update(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    cfg["vae"].update(vae)
    cfg["text_encoder"].update(clip, num_hidden_layers=2)
    if cfg["pipeline"] == "FluxPipeline":
        cfg["transformer"].update(
            num_layers=2,
            num_single_layers=4,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=64,
            pooled_projection_dim=32,
            axes_dims_rope=[4, 6, 6],
        )
        cfg["text_encoder_2"].update(t5)
    elif cfg["pipeline"] == "StableDiffusionXLPipeline":
        cfg["unet"].update(
            sample_size=32,
            block_out_channels=[32, 64],
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
            attention_head_dim=[2, 4],
            transformer_layers_per_block=[1, 2],
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            cross_attention_dim=64,
        )
        cfg["text_encoder_2"].update(clip, num_hidden_layers=2)
    else:  # SD3
        cfg["transformer"].update(
            sample_size=32,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=64,
            caption_projection_dim=32,
            pooled_projection_dim=64,
            pos_embed_max_size=16,
        )
        cfg["text_encoder_2"].update(clip, num_hidden_layers=2, hidden_act="gelu")
        cfg["text_encoder_3"].update(t5)
    return cfg


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """tinyflux (FLUX.1-schnell cut small), its reduced build tinyflux@u1 (through the command line),
    tinysd3 (SD 3.5 Large cut small) and tinysdxl (SDXL's UNet and encoders cut small), written with small
    shards and small chunks."""
    root = tmp_path_factory.mktemp("random-weights")
    configs = root / "configs"  # the real configs and the small ones
    shutil.copytree(random_model.CONFIGS, configs)
    (configs / "tinyflux.json").write_text(json.dumps(_small("flux-schnell")))
    (configs / "tinysd3.json").write_text(json.dumps(_small("sd3.5-large")))
    (configs / "tinysdxl.json").write_text(json.dumps(_small("sdxl")))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(random_model, "CONFIGS", configs)
        mp.setattr(random_weights, "CHUNK", CHUNK)
        messages: list[str] = []
        full = random_weights.write_pipeline("tinyflux", root / "full", shard_bytes=SHARD, progress=messages.append)
        random_weights.main(["tinyflux@u1", "--out", str(root / "u1"), "--shard-gib", str(SHARD / 2**30)])
        sd3 = random_weights.write_pipeline("tinysd3", root / "sd3", shard_bytes=SHARD, progress=messages.append)
        sdxl = random_weights.write_pipeline("tinysdxl", root / "sdxl", shard_bytes=SHARD, progress=messages.append)
        yield {"root": root, "full": full, "u1": root / "u1", "sd3": sd3, "sdxl": sdxl, "messages": messages}


@pytest.fixture(scope="module")
def loaded(built):
    pipe = diffusers.DiffusionPipeline.from_pretrained(built["full"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _expected(component: str, name: str, shape, seed: int = 0):
    """The documented value of one tensor, rounded to bf16 by torch."""
    if (len(shape) == 1 and name.endswith("weight")) or name.endswith("gamma"):  # norm scales
        values = np.ones(shape, dtype=np.float32)
    else:
        rng = np.random.default_rng(zlib.crc32(f"{seed}/{component}/{name}".encode()))
        values = rng.standard_normal(math.prod(shape), dtype=np.float32).reshape(shape)
        if name.endswith("bias"):
            values = values * np.float32(0.02)
        else:
            values = values / np.float32(math.sqrt(math.prod(shape[1:])))
    return torch.from_numpy(values).to(torch.bfloat16)


def _weights(directory: Path) -> dict[str, Path]:
    """Every tensor name in a component folder → the safetensors file holding it."""
    found = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safetensors.safe_open(path, "pt") as f:
            found.update(dict.fromkeys(f.keys(), path))
    return found


def _shapes(directory: Path) -> dict[str, tuple]:
    shapes = {}
    for name, path in _weights(directory).items():
        with safetensors.safe_open(path, "pt") as f:
            shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def _models(folder: Path) -> list[str]:
    index = json.loads((folder / "model_index.json").read_text())
    return [c for c, entry in index.items() if isinstance(entry, list) and (folder / c / "config.json").is_file()]


def test_bf16_rounding_matches_torch():
    ties = [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-8 + 2**-20, 1 - 2**-9]  # halfway cases, near ones
    values = np.concatenate(
        [np.array(ties + [0.0, -0.0, 1e-40, 3e38, -2.5], dtype=np.float32), np.random.default_rng(1).normal(size=5000)]
    ).astype(np.float32)
    reference = torch.from_numpy(values.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(random_weights.bf16_bits(values.copy()), reference)


@pytest.mark.parametrize("which", ["full", "sd3", "sdxl"])
def test_folder_is_what_save_pretrained_writes(built, which, tmp_path, monkeypatch):
    """Every file but the weights byte for byte as save_pretrained writes the same config's pipeline (the
    transformers configs but their dtype), and the same tensor names and shapes in the weights."""
    monkeypatch.setattr(random_model, "CONFIGS", built["root"] / "configs")
    ours = built[which]
    reference = tmp_path / "reference"
    family = {"full": "tinyflux", "sd3": "tinysd3", "sdxl": "tinysdxl"}[which]
    random_model.build(family).save_pretrained(reference, safe_serialization=True)
    files = {p.relative_to(reference) for p in reference.rglob("*") if p.is_file() and p.suffix != ".safetensors"}
    assert files <= {p.relative_to(ours) for p in ours.rglob("*") if p.is_file()}
    for rel in sorted(files):
        if (ours / rel).read_bytes() != (reference / rel).read_bytes():
            mine, theirs = json.loads((ours / rel).read_text()), json.loads((reference / rel).read_text())
            assert (mine.pop("dtype"), theirs.pop("dtype")) == ("bfloat16", "float32"), rel
            assert mine == theirs, rel
    assert set(_models(ours)) == set(_models(reference))
    for component in _models(ours):
        assert _shapes(ours / component) == _shapes(reference / component), component
    if which == "full":  # the tied T5 embedding saved once, as transformers does
        assert "shared.weight" in _shapes(ours / "text_encoder_2")
        assert "encoder.embed_tokens.weight" not in _shapes(ours / "text_encoder_2")


@pytest.mark.parametrize("which", ["full", "sd3", "sdxl"])
def test_every_model_loads_without_missing_or_unexpected_keys(built, which):
    folder = built[which]
    index = json.loads((folder / "model_index.json").read_text())
    for component in _models(folder):
        library, cls_name = index[component]
        cls = getattr(diffusers if library == "diffusers" else transformers, cls_name)
        _, info = cls.from_pretrained(folder / component, output_loading_info=True)
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
            assert not info.get(key), (component, key, info[key])


def test_every_weight_is_the_documented_bf16_value(built, loaded):
    for component in _models(built["full"]):
        module = getattr(loaded, component)
        state = module.state_dict()
        assert all(t.device.type == "cpu" for t in state.values())
        for name, shape in _shapes(built["full"] / component).items():
            assert torch.equal(state[name], _expected(component, name, shape).float()), (component, name)
    t5 = loaded.text_encoder_2
    assert t5.encoder.embed_tokens.weight.data_ptr() == t5.shared.weight.data_ptr()
    # the norm scales are 1, the biases small, the matrices scaled by their fan-in
    transformer = loaded.transformer.state_dict()
    assert torch.all(transformer["transformer_blocks.0.attn.norm_q.weight"] == 1)
    assert 0.01 < transformer["x_embedder.bias"].std() < 0.03
    assert 0.1 < transformer["x_embedder.weight"].std() * math.sqrt(64) < 1.1


def test_shards_open_with_safetensors_and_the_index_maps_every_key(built):
    folder = built["full"]
    model_index = json.loads((folder / "model_index.json").read_text())
    sharded = 0
    for component in _models(folder):
        directory = folder / component
        files = sorted(directory.glob("*.safetensors"))
        stem = "diffusion_pytorch_model" if model_index[component][0] == "diffusers" else "model"
        index_path = directory / f"{stem}.safetensors.index.json"
        names = _weights(directory)
        if len(files) == 1:
            assert files[0].name == f"{stem}.safetensors" and not index_path.exists()
            continue
        sharded += 1
        assert [f.name for f in files] == [
            f"{stem}-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)
        ]
        index = json.loads(index_path.read_text())
        assert {k: Path(v) for k, v in index["weight_map"].items()} == {k: Path(p.name) for k, p in names.items()}
        total = 0
        for path in files:
            raw = path.read_bytes()
            (length,) = struct.unpack("<Q", raw[:8])
            header = json.loads(raw[8 : 8 + length])
            assert length % 8 == 0 and header.pop("__metadata__") == {"format": "pt"}
            spans = sorted(entry["data_offsets"] for entry in header.values())
            assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
            assert spans[-1][1] == len(raw) - 8 - length  # back to back, nothing after
            assert {entry["dtype"] for entry in header.values()} == {"BF16"}
            assert spans[-1][1] <= SHARD or len(header) == 1
            total += spans[-1][1]
        assert index["metadata"]["total_size"] == total
        if stem == "model":
            assert index["metadata"]["total_parameters"] == total // 2  # no buffers, the tie saved once
    assert sharded >= 3


def _random_forward(transformer):
    """The small FLUX transformer on seeded random inputs (16 image tokens in a 4x4 grid, 8 text tokens)."""
    g = torch.Generator().manual_seed(0)
    tokens, text = 16, 8
    ids = torch.stack([torch.zeros(tokens), torch.arange(tokens) // 4, torch.arange(tokens) % 4], dim=1)
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, tokens, 64, generator=g),
            encoder_hidden_states=torch.randn(1, text, 64, generator=g),
            pooled_projections=torch.randn(1, 32, generator=g),
            timestep=torch.tensor([0.5]),
            img_ids=ids,
            txt_ids=torch.zeros(text, 3),
        ).sample


def test_the_pipeline_runs_and_stays_finite(loaded):
    out = loaded(
        "a photo of a cat",
        num_inference_steps=1,
        height=64,
        width=64,
        max_sequence_length=16,
        guidance_scale=0.0,
        output_type="np",
    )
    assert np.isfinite(out.images).all() and out.images.std() > 0
    sample = _random_forward(loaded.transformer)
    assert torch.isfinite(sample).all() and 0.1 < sample.std() < 10


def test_a_full_depth_transformer_keeps_its_activations_sane(tmp_path):
    """FLUX.1's 19 double-stream + 38 single-stream blocks (narrow): the residual stream grows slowly and
    the output stays near unit scale with these values."""
    cfg = dict(random_model.config("flux-schnell")["transformer"])
    cfg.update(attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32)
    cfg["axes_dims_rope"] = [8, 12, 12]
    module, library = random_weights.meta_module("transformer", cfg)
    random_weights.write_model(module, library, tmp_path, "transformer", seed=0, shard_bytes=2**30, progress=print)
    transformer = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path).eval()
    stream = []
    for block in list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks):
        block.register_forward_hook(lambda _m, _i, out: stream.append(out[-1] if isinstance(out, tuple) else out))
    sample = _random_forward(transformer)
    assert len(stream) == 57 and all(torch.isfinite(h).all() for h in stream)
    assert max(h.std() for h in stream) < 10
    assert torch.isfinite(sample).all() and 0.1 < sample.std() < 10


def test_a_reduced_build_holds_the_full_builds_blocks(built):
    full_names = _weights(built["full"] / "transformer")
    u1_names = _weights(built["u1"] / "transformer")
    assert "single_transformer_blocks.1.proj_out.weight" in u1_names
    assert "single_transformer_blocks.2.proj_out.weight" in full_names
    assert "single_transformer_blocks.2.proj_out.weight" not in u1_names
    for component in _models(built["u1"]):
        full, u1 = _weights(built["full"] / component), _weights(built["u1"] / component)
        assert set(u1) <= set(full), component
        for name, path in u1.items():
            with safetensors.safe_open(path, "pt") as a, safetensors.safe_open(full[name], "pt") as b:
                assert torch.equal(a.get_tensor(name), b.get_tensor(name)), (component, name)
    marker = json.loads((built["u1"] / random_model.DONE).read_text())
    assert marker["model"] == "random:tinyflux@u1" and marker["dtype"] == "bfloat16"


def test_source_folder_writes_the_transformer_families_and_clears_killed_builds(built, tmp_path, monkeypatch):
    monkeypatch.setenv("STEPWISE_HOME", str(tmp_path))
    monkeypatch.setattr(random_model, "CONFIGS", built["root"] / "configs")
    leftover = random_model.cache_root() / ".random-tinyflux-u1-src.tmp-999999999-x"  # no such process
    leftover.mkdir(parents=True)
    messages: list[str] = []
    folder = random_model.source_folder("random:tinyflux@u1", progress=messages.append)
    assert folder == random_model.cache_root() / "random-tinyflux-u1-src" and not leftover.exists()
    assert json.loads((folder / random_model.DONE).read_text())["writer"] == "bench.random_weights"
    assert any(m.startswith("text_encoder_2 (T5EncoderModel)") for m in messages)
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary sibling left
    count = len(messages)
    assert random_model.source_folder("random:tinyflux@u1", progress=messages.append) == folder
    assert len(messages) == count  # reused, not rewritten


@pytest.mark.parametrize("family", ["flux-dev", "sd3.5-large"])
def test_the_new_configs_match_the_registry_sizes(family):
    import registry

    cfg = random_model.config(family)
    entry = registry.get(cfg["registry_model"])
    assert cfg["registry_model"] == family
    for component in random_weights.PIPELINES[cfg["pipeline"]]["models"]:
        module, _ = random_weights.meta_module(component, cfg[component])
        params = sum(p.numel() for p in module.parameters()) / 1e6
        assert abs(params - entry.params_m[component]) < max(1, 0.005 * params), component  # M, rounded down
    reduced = random_model.config(f"{family}@u1")
    assert reduced["transformer"]["num_layers"] == 1
    if family == "flux-dev":
        module, _ = random_weights.meta_module("transformer", cfg["transformer"])
        assert "time_text_embed.guidance_embedder.linear_1.weight" in module.state_dict()


def test_without_tqdm_progress_is_a_line_per_tenth(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm → ImportError
    cfg = _small("flux-schnell")["vae"]
    module, library = random_weights.meta_module("vae", cfg)
    messages: list[str] = []
    random_weights.write_model(module, library, tmp_path, "vae", seed=0, shard_bytes=2**30, progress=messages.append)
    assert messages[0].startswith("vae (AutoencoderKL): 0.7 M values, 1.3 MiB bf16 in 1 file(s)")
    assert len(messages) == 11 and messages[-1] == "  vae: 1.3 MiB of 1.3 MiB"


# --- Qwen-Image (QwenImagePipeline: transformer, AutoencoderKLQwenImage, Qwen2.5-VL text encoder) ----------


def _small_qwen() -> dict:
    """configs/qwen-image.json cut small: 2 blocks, 2 text layers, 2 vision blocks, narrow widths; z_dim and
    the 16 latents_mean/std values kept (the transformer's 64 input channels are 16 latents × 2×2 patches)."""
    cfg = copy.deepcopy(random_model.config("qwen-image"))
    cfg["transformer"].update(num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64)
    cfg["transformer"]["axes_dims_rope"] = [4, 6, 6]
    cfg["vae"].update(base_dim=16, num_res_blocks=1)
    text = cfg["text_encoder"]
    text.update(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
    # vocab_size: above the tiny tokenizer's 754 ids
    text.update(num_hidden_layers=2, vocab_size=1024, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    text["vision_config"].update(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64)
    text["vision_config"]["fullatt_block_indexes"] = [1]
    return cfg


def _stub_qwen_tokenizer():
    """A Qwen2TokenizerFast built in code: byte-level BPE over the 256 byte symbols, no merges, Qwen's chat
    tokens added (ids 256-258, inside the small text encoder's 512). Stands in for the lead's
    ``exporters.qwen_image.text.tiny_tokenizer`` where that is not there yet."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from exporters.vocab import bytes_to_unicode

    vocab = {symbol: i for i, symbol in enumerate(bytes_to_unicode().values())}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = transformers.Qwen2TokenizerFast(
        tokenizer_object=bpe, unk_token=None, bos_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def _qwen_tokenizer_module(monkeypatch) -> None:
    """``exporters.qwen_image.text.tiny_tokenizer`` as random_weights imports it: the real one when the
    package has it, else the stub."""
    try:
        from exporters.qwen_image.text import tiny_tokenizer  # noqa: F401
    except ImportError:
        import types

        package = types.ModuleType("exporters.qwen_image")
        package.__path__ = []
        text = types.ModuleType("exporters.qwen_image.text")
        text.tiny_tokenizer = _stub_qwen_tokenizer
        package.text = text
        monkeypatch.setitem(sys.modules, "exporters.qwen_image", package)
        monkeypatch.setitem(sys.modules, "exporters.qwen_image.text", text)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """tinyqwen (Qwen-Image cut small) and its reduced build tinyqwen@u1, small shards and chunks."""
    root = tmp_path_factory.mktemp("random-qwen")
    configs = root / "configs"
    shutil.copytree(random_model.CONFIGS, configs)
    (configs / "tinyqwen.json").write_text(json.dumps(_small_qwen()))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(random_model, "CONFIGS", configs)
        mp.setattr(random_weights, "CHUNK", CHUNK)
        _qwen_tokenizer_module(mp)
        messages: list[str] = []
        full = random_weights.write_pipeline("tinyqwen", root / "full", shard_bytes=SHARD, progress=messages.append)
        u1 = random_weights.write_pipeline("tinyqwen@u1", root / "u1", shard_bytes=SHARD, progress=messages.append)
        yield {"root": root, "configs": configs, "full": full, "u1": u1, "messages": messages}


def _reference_module(component: str, cfg: dict):
    """The component built in PyTorch from its config (fp32, CPU), as save_pretrained would save it."""
    if component == "text_encoder":
        cls, text_config = random_model.text_encoder_class(cfg)
        return cls(text_config)
    return getattr(diffusers, cfg["_class_name"]).from_config(random_model._strip(cfg))


def test_qwen_folder_is_what_save_pretrained_writes(qwen, tmp_path):
    """Each model's config.json (but the transformers dtype) and its tensor names and shapes as save_pretrained
    writes the same module; the text encoder under the hub's names (model.layers..., visual..., lm_head)."""
    cfg = _small_qwen()
    index = json.loads((qwen["full"] / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"
    assert index["text_encoder"] == ["transformers", "Qwen2_5_VLForConditionalGeneration"]
    assert index["vae"] == ["diffusers", "AutoencoderKLQwenImage"]
    assert set(_models(qwen["full"])) == {"transformer", "vae", "text_encoder"}
    for component in _models(qwen["full"]):
        module = _reference_module(component, cfg[component])
        module.save_pretrained(tmp_path / component, safe_serialization=True)
        assert _shapes(qwen["full"] / component) == _shapes(tmp_path / component), component
        mine = json.loads((qwen["full"] / component / "config.json").read_text())
        theirs = json.loads((tmp_path / component / "config.json").read_text())
        if component == "text_encoder":
            assert (mine.pop("dtype"), theirs.pop("dtype")) == ("bfloat16", "float32")
        assert mine == theirs, component
    names = _shapes(qwen["full"] / "text_encoder")
    assert {"model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"} <= set(names)
    assert "visual.blocks.1.attn.qkv.weight" in names and "visual.merger.mlp.2.weight" in names
    assert not any(n.startswith("model.language_model.") or n.startswith("model.visual.") for n in names)
    scheduler = json.loads((qwen["full"] / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["time_shift_type"] == "exponential" and scheduler["max_image_seq_len"] == 8192
    assert scheduler["shift_terminal"] == 0.02


def test_qwen_pipeline_loads_every_weight_as_written_and_runs(qwen):
    """DiffusionPipeline.from_pretrained loads every tensor (no missing/unexpected key) with its documented bf16
    value (the VAE's RMS-norm gammas 1), and two steps at 64×64 stay finite."""
    folder = qwen["full"]
    index = json.loads((folder / "model_index.json").read_text())
    for component in _models(folder):
        library, cls_name = index[component]
        cls = getattr(diffusers if library == "diffusers" else transformers, cls_name)
        _, info = cls.from_pretrained(folder / component, output_loading_info=True)
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
            assert not info.get(key), (component, key, info[key])
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "QwenImagePipeline"
    for component in _models(folder):
        module = getattr(pipe, component)
        state = module.state_dict()
        saved = dict(random_weights.saved_tensors(module))  # checkpoint name → shape
        assert saved == _shapes(folder / component), component
        for (name, _), (saved_name, shape) in zip(state.items(), random_weights.saved_tensors(module), strict=True):
            assert torch.equal(state[name], _expected(component, saved_name, shape).float()), (component, name)
    gammas = [t for n, t in pipe.vae.state_dict().items() if n.endswith("gamma")]
    assert gammas and all(torch.all(t == 1) for t in gammas)
    # 2 steps: with 1, shift_terminal (0.02) stretches the one sigma by 0/0 in diffusers (NaN latents)
    out = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np")
    assert np.isfinite(out.images).all() and out.images.std() > 0


def test_qwen_reduced_build_holds_the_full_builds_blocks(qwen):
    assert "transformer_blocks.1.img_mod.1.weight" in _weights(qwen["full"] / "transformer")
    assert "transformer_blocks.1.img_mod.1.weight" not in _weights(qwen["u1"] / "transformer")
    assert "model.layers.1.mlp.up_proj.weight" not in _weights(qwen["u1"] / "text_encoder")
    assert "visual.blocks.1.mlp.up_proj.weight" in _weights(qwen["u1"] / "text_encoder")  # the vision tower full
    for component in _models(qwen["u1"]):
        full, u1 = _weights(qwen["full"] / component), _weights(qwen["u1"] / component)
        assert set(u1) <= set(full), component
        for name, path in u1.items():
            with safetensors.safe_open(path, "pt") as a, safetensors.safe_open(full[name], "pt") as b:
                assert torch.equal(a.get_tensor(name), b.get_tensor(name)), (component, name)
    marker = json.loads((qwen["u1"] / random_model.DONE).read_text())
    assert marker["model"] == "random:tinyqwen@u1"


def test_qwen_image_config_is_the_hubs_size():
    """Full size, on the meta device: the transformer's 20,430,401,088 parameters (the hub's 40.86 GB of bf16
    shards) and Qwen2.5-VL-7B's 8,292,166,656 (vision tower and untied lm_head included); the reduced
    builds cut the transformer blocks and the text layers, nothing else."""
    cfg = random_model.config("qwen-image")
    counts = {}
    for component in random_weights.PIPELINES[cfg["pipeline"]]["models"]:
        module, _ = random_weights.meta_module(component, cfg[component])
        counts[component] = sum(math.prod(shape) for _, shape in random_weights.saved_tensors(module))
    assert counts["transformer"] == 20_430_401_088
    assert counts["text_encoder"] == 8_292_166_656
    assert 120e6 < counts["vae"] < 130e6
    reduced = random_model.config("qwen-image@u2")
    assert reduced["transformer"]["num_layers"] == 2 and reduced["text_encoder"]["num_hidden_layers"] == 2
    assert reduced["text_encoder"]["vision_config"]["depth"] == 32
    plan = random_model.reduced("qwen-image")
    assert (plan["units"], plan["denoiser"]["real"], plan["text"]["real"]) == ([1, 2], 60, 28)


def test_the_qwen_tokenizer_is_imported_lazily_from_the_exporter(monkeypatch):
    sentinel = object()
    _qwen_tokenizer_module(monkeypatch)
    monkeypatch.setattr(sys.modules["exporters.qwen_image.text"], "tiny_tokenizer", lambda: sentinel)
    assert random_weights._tokenizer("qwen") is sentinel
