"""Our graphs on ONNX Runtime's CPU EP with session options and feeding that differ from the engine's: the
tuning candidates, each measured against the engine as it is."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.tokenize import PromptTokenizer

from ..images import to_uint8
from .base import Engine, cfg

GRAPH_LEVELS = {"disable": 0, "basic": 1, "extended": 2, "layout": 3, "all": 99}


def session_options(threads: int, options: dict):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel(GRAPH_LEVELS[options.get("graph_level", "all")])
    # the engine's own settings (engine/session.py) unless a candidate changes one
    so.enable_mem_pattern = bool(options.get("mem_pattern", False))
    if "cpu_arena" in options:
        so.enable_cpu_mem_arena = bool(options["cpu_arena"])
    if options.get("optimized_model_filepath"):
        so.optimized_model_filepath = str(options["optimized_model_filepath"])
    if options.get("profile_prefix"):
        so.enable_profiling = True
        so.profile_file_prefix = str(options["profile_prefix"])
    for name, value in options.get("free_dims", {}).items():
        so.add_free_dimension_override_by_name(name, int(value))
    for key, value in options.get("config", {}).items():
        so.add_session_config_entry(key, str(value))
    return so


def refuse_other_families(folder: Path) -> None:
    """The tuning candidates feed a UNet with SD 1.5's inputs only: a one-line refusal for other families."""
    from registry import manifest

    family = manifest.read(folder, check_files=False).family
    if family != "sd15":
        raise SystemExit(f"the ORT tuning candidates are written for SD 1.5's UNet, not for a {family} model")


class OrtEngine(Engine):
    def __init__(
        self,
        unet: str,
        vae_decoder: str,
        text_encoder: str,
        threads: int,
        scaling_factor: float,
        options: dict | None = None,
        vae_options: dict | None = None,
        split_guidance: bool = False,
        io_binding: bool = False,
    ):
        import onnxruntime as ort

        refuse_other_families(Path(text_encoder).parent.parent)
        options = options or {}
        providers = ["CPUExecutionProvider"]
        self.unet = ort.InferenceSession(unet, session_options(threads, options), providers=providers)
        vae_opts = dict(options if vae_options is None else vae_options)
        if vae_opts.get("optimized_model_filepath"):
            vae_opts["optimized_model_filepath"] = str(
                Path(vae_opts["optimized_model_filepath"]).with_suffix(".vae.onnx")
            )
        self.vae = ort.InferenceSession(vae_decoder, session_options(threads, vae_opts), providers=providers)
        self.text = ort.InferenceSession(text_encoder, session_options(threads, {}), providers=providers)
        self.tokenizer = PromptTokenizer(Path(text_encoder).parent.parent / "tokenizer")
        self.types = {i.name: i.type for i in self.unet.get_inputs()}
        self.scaling_factor = scaling_factor
        self.split_guidance = split_guidance
        self.io_binding = io_binding
        self.sessions = [self.unet, self.vae]

    def encode(self, prompt, negative, guidance=7.5):
        ids = [self.tokenizer(text).ids for text in (negative, prompt)]
        embeds = np.concatenate([self.text.run(["last_hidden_state"], {"input_ids": i})[0] for i in ids])
        return {"embeds": embeds, "pooled": None}

    def _feeds(self, sample, t, embeds):
        t_type = np.int64 if "int64" in self.types["timestep"] else np.float32
        return {
            "sample": np.ascontiguousarray(sample, dtype=np.float32),
            "timestep": np.asarray(t, dtype=t_type).reshape(()),
            "encoder_hidden_states": np.ascontiguousarray(embeds, dtype=np.float32),
        }

    def _run(self, feeds):
        if not self.io_binding:
            return self.unet.run(["out_sample"], feeds)[0]
        binding = self.unet.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output("out_sample")
        self.unet.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def step(self, latents, t, cond, guidance):
        embeds = cond["embeds"]
        if self.split_guidance:  # two batch-1 runs instead of one batch of two
            uncond = self._run(self._feeds(latents, t, embeds[:1]))
            cond = self._run(self._feeds(latents, t, embeds[1:2]))
            return uncond + np.float32(guidance) * (cond - uncond)
        out = self._run(self._feeds(np.concatenate([latents, latents]), t, embeds))
        return cfg(out, guidance)

    def decode(self, latents):
        scaled = (np.asarray(latents, np.float32) / self.scaling_factor).astype(np.float32)
        return to_uint8(self.vae.run(["sample"], {"latent_sample": scaled})[0])

    def end_profiling(self) -> list[str]:
        return [s.end_profiling() for s in self.sessions]
