"""``python -m bench.deepfloyd_if_parts``: DeepFloyd IF's parts at full size, one at a time, where the whole cascade
does not fit the machine (``bench.big_models deepfloyd-if`` runs the cascade end to end where it does).

From the random full-size folders ``bench.random_weights`` writes (``deepfloyd-if``: T5-XXL + IF-I-XL's UNet,
``deepfloyd-if-ii``: IF-II-L's UNet), each part is exported by the cascade exporter's own streamed path
(``exporters.deepfloyd_if.export._load`` + ``exporters.main._export_components``, the calls
``export_cascade`` makes) and then timed in an onnxruntime session with the engine's options
(``engine.session.session_options``) on the inputs the engine gives it: T5 one (1, 77) prompt (the engine
encodes the prompt and the negative prompt one after the other), a UNet its stage's guidance batch of 2 at its
size (IF-I-XL 64x64, IF-II-L 256x256 with the upscaled image's 3 extra channels and the noise level as
``class_labels``). Every export and every timing runs as its own process: its wall time and its peak RSS
(``wait4``) are recorded, one JSON line each in ``--results``.

Stage III (``deepfloyd-if-iii``: the SD x4 upscaler) has three parts: its CLIP (``text_encoder_3``, one 77-token
prompt), its UNet (``unet_3``: batch 2 of 4 latent + 3 image channels at stage II's 256x256, the noise level as
``class_labels``) and its VAE decoder (``vae_decoder_3``), timed at the output sizes ``--decode-sizes`` names:
``512`` decodes whole (its mid-block attention over (512/4)^2 tokens), ``1024t`` decodes 1024x1024 in
``enable_tiling()``'s tiles as the engine does (engine.vae.TiledDecoder), ``1024`` whole (65,536 tokens: a
16 GiB score tensor, over what this machine holds).

    python -m bench.deepfloyd_if_parts --root DIR --parts text_encoder:int8 unet_2:int4 --runs 3
    python -m bench.deepfloyd_if_parts --root DIR --parts unet_3:fp32 vae_decoder_3:fp32 --decode-sizes 512 1024t
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .big_models import folder_bytes, run

SOURCES = {
    "text_encoder": ("deepfloyd-if", 1),
    "unet": ("deepfloyd-if", 1),
    "unet_2": ("deepfloyd-if-ii", 2),
    "text_encoder_3": ("deepfloyd-if-iii", 3),
    "unet_3": ("deepfloyd-if-iii", 3),
    "vae_decoder_3": ("deepfloyd-if-iii", 3),
}
T5_TOKENS = 77  # IFPipeline.encode_prompt's window (and CLIP's, stage III's)


def component(part: str) -> str:
    """The pipeline's component a part is (``unet_2`` → ``unet``)."""
    return part.removesuffix("_2").removesuffix("_3")


def export_part(root: Path, part: str, weights: str, out: Path) -> None:
    """Export ``part`` of the random cascade under ``root`` to ``out/<part>/model.onnx`` in ``weights``."""
    from exporters import main
    from exporters.deepfloyd_if.export import _load, _resolve_stage

    family, stage = SOURCES[part]
    src = _resolve_stage(str(root / f"random-{family}-src"), stage)
    pipe = _load(src, without_text_encoder=part not in ("text_encoder", "text_encoder_3"))
    for other in ("text_encoder", "unet"):  # the stage's other part stays out (built on the meta device only)
        if other != component(part):
            setattr(pipe, other, None)
    unet_weights = weights if part.startswith("unet") else "fp32"
    text_weights = weights if part == "text_encoder" else "fp32"  # stage III's CLIP: fp32, as the export does
    rewrite = main._Rewrite(True, unet_weights, "fp32", text_weights, streamed=True)
    backend = main.backends.make(False, pipe)
    target = out / part
    target.parent.mkdir(parents=True, exist_ok=True)
    entries = main._export_components(pipe, backend, target, 17, print, rewrite, src, only=(component(part),))
    (out / f"{part}.json").write_text(json.dumps(entries, indent=2, default=str) + "\n")


def part_inputs(part: str, decode_size: int = 1024):
    import numpy as np

    rng = np.random.default_rng(0)
    if part in ("text_encoder", "text_encoder_3"):
        ids = rng.integers(3, 32000, size=(1, T5_TOKENS), dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if part == "vae_decoder_3":  # the x4 VAE: latents a quarter of the output's side
        return {"latent_sample": rng.standard_normal((1, 4, decode_size // 4, decode_size // 4), dtype=np.float32)}
    size, channels, text = {"unet": (64, 3, 4096), "unet_2": (256, 6, 4096), "unet_3": (256, 7, 1024)}[part]
    inputs = {
        "sample": rng.standard_normal((2, channels, size, size), dtype=np.float32),
        "timestep": np.array(500.0, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((2, T5_TOKENS, text), dtype=np.float32),
    }
    if part in ("unet_2", "unet_3"):  # the noise level: stage II's 250, stage III's 100
        inputs["class_labels"] = np.full((2,), 250 if part == "unet_2" else 100, dtype=np.int64)
    return inputs


def time_part(path: Path, part: str, runs: int, threads: int | None, decode: str = "1024") -> dict:
    """Load the part's graph and run it ``runs`` times: load seconds and each run's seconds. ``decode``: the VAE
    decoder's output size, ``<size>t`` in the engine's tiles (stage III's VAE sample_size, 256: 64-latent tiles)."""
    import numpy as np
    import onnxruntime as ort

    from engine.session import session_options
    from engine.vae import TiledDecoder, Tiling

    started = time.perf_counter()
    session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    load = time.perf_counter() - started
    names = {i.name for i in session.get_inputs()}
    size = int(decode.rstrip("t")) if part == "vae_decoder_3" else 0
    inputs = {k: v for k, v in part_inputs(part, size).items() if k in names}

    def call():
        return session.run(None, inputs)

    if decode.endswith("t"):
        tiles = TiledDecoder(lambda outputs=None, **feeds: {"sample": session.run(None, feeds)[0]}, Tiling(256, 64))

        def call():
            return [tiles.decode(inputs["latent_sample"])]

    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        outputs = call()
        seconds.append(round(time.perf_counter() - started, 3))
    finite = all(bool(np.isfinite(o).all()) for o in outputs)
    return {"load_s": round(load, 2), "run_s": seconds, "finite": finite, "output": list(outputs[0].shape)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="holds random-deepfloyd-if{,-ii}-src")
    parser.add_argument("--parts", nargs="+", default=["text_encoder:int8", "unet_2:int4"], help="PART:WEIGHTS")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--decode-sizes", nargs="+", default=["512", "1024t"], help="vae_decoder_3: SIZE or SIZEt")
    parser.add_argument("--results", type=Path, default=None, help="JSON lines (default: ROOT/if-parts.jsonl)")
    parser.add_argument("--export-one", nargs=2, metavar=("PART", "WEIGHTS"), help=argparse.SUPPRESS)
    parser.add_argument("--time-one", nargs=3, metavar=("PART", "WEIGHTS", "DECODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.export_one:
        part, weights = args.export_one
        return export_part(args.root, part, weights, args.root / f"parts-{weights}")
    if args.time_one:
        part, weights, decode = args.time_one
        path = args.root / f"parts-{weights}" / part / component(part) / "model.onnx"
        print("RESULT " + json.dumps(time_part(path, part, args.runs, args.threads, decode)))
        return None
    results = args.results or args.root / "if-parts.jsonl"
    me = [sys.executable, "-m", "bench.deepfloyd_if_parts", "--root", str(args.root)]
    for spec in args.parts:
        part, weights = spec.split(":")
        record = {"model": "deepfloyd-if", "part": part, "weights": weights}
        log = args.root / f"export-{part}-{weights}.log"
        exported = run([*me, "--export-one", part, weights], log)
        folder = args.root / f"parts-{weights}" / part
        disk = round(folder_bytes(folder) / 2**30, 2) if folder.is_dir() else 0
        lines = [{**record, "stage": "export", **exported, "disk_gb": disk}]
        for decode in (args.decode_sizes if part == "vae_decoder_3" else ["-"]) if exported["rc"] == 0 else ():
            log = args.root / f"time-{part}-{weights}-{decode}.log"
            threads = ["--threads", str(args.threads)] if args.threads else []
            timed = run([*me, "--time-one", part, weights, decode, "--runs", str(args.runs), *threads], log)
            found = [ln for ln in log.read_text().splitlines() if ln.startswith("RESULT ")]
            sized = {"decode": decode} if part == "vae_decoder_3" else {}
            lines.append({**record, **sized, "stage": "run", **timed, **(json.loads(found[-1][7:]) if found else {})})
        for line in lines:
            line["when"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            with open(results, "a") as handle:
                handle.write(json.dumps(line) + "\n")
            print(json.dumps(line))


if __name__ == "__main__":
    main()
