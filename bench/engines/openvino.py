"""OpenVINO's CPU plugin on our exported ONNX graphs, reshaped to the benchmark's static shapes (what
OpenVINO's own Stable Diffusion guides do), at fp32 or at its default inference precision (bf16 on CPUs
with AVX-512 BF16 / AMX)."""

from __future__ import annotations

import numpy as np

from ..images import to_uint8
from .base import Engine, cfg


class OpenVinoEngine(Engine):
    def __init__(
        self,
        folder: str,
        threads: int,
        width: int,
        height: int,
        scaling_factor: float,
        precision: str | None = None,
    ):
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": threads}
        if precision:
            config["INFERENCE_PRECISION_HINT"] = precision
        h, w = height // 8, width // 8

        def compile_graph(name: str, shapes: dict):
            model = core.read_model(f"{folder}/{name}/model.onnx")
            if name == "unet":  # the cross-attention width is fixed in the graph; keep it
                shapes["encoder_hidden_states"][2] = model.input("encoder_hidden_states").get_partial_shape()[2]
            model.reshape(shapes)
            return core.compile_model(model, "CPU", config)

        self.text = compile_graph("text_encoder", {"input_ids": [1, 77]}).create_infer_request()
        self.unet = compile_graph(
            "unet", {"sample": [2, 4, h, w], "timestep": [], "encoder_hidden_states": [2, 77, -1]}
        ).create_infer_request()
        self.vae = compile_graph("vae_decoder", {"latent_sample": [1, 4, h, w]}).create_infer_request()
        self.timestep_type = self.unet.model_inputs[1].get_element_type().to_dtype()
        self.scaling_factor = scaling_factor
        self.tokenizer = None
        self.folder = folder
        self.precision = core.get_property("CPU", "INFERENCE_PRECISION_HINT") if not precision else precision

    def encode(self, prompt, negative):
        if self.tokenizer is None:
            from pathlib import Path

            from engine.tokenize import PromptTokenizer

            self.tokenizer = PromptTokenizer(Path(self.folder) / "tokenizer")
        states = []
        for text in (negative, prompt):
            ids = self.tokenizer(text).ids
            self.text.infer({"input_ids": ids})
            states.append(np.array(self.text.get_tensor("last_hidden_state").data))
        return np.concatenate(states)

    def step(self, latents, t, embeds, guidance):
        self.unet.infer(
            {
                "sample": np.concatenate([latents, latents]).astype(np.float32),
                "timestep": np.asarray(t, dtype=self.timestep_type).reshape(()),
                "encoder_hidden_states": np.ascontiguousarray(embeds, np.float32),
            }
        )
        return cfg(np.array(self.unet.get_output_tensor(0).data), guidance)

    def decode(self, latents):
        self.vae.infer({"latent_sample": (np.asarray(latents, np.float32) / self.scaling_factor).astype(np.float32)})
        return to_uint8(np.array(self.vae.get_output_tensor(0).data))
