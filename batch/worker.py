"""What every batch worker does, in a local process or a Ray actor: load the pipeline once, then generate the
jobs it is handed and send back the pixels (the driver writes the files, so workers on other machines need
no shared disk for the output)."""

from __future__ import annotations

import json
import os
import time

import numpy as np


class BatchStopped(RuntimeError):
    """The backend failed as a whole (a worker killed, a node lost); the finished images and results.jsonl
    are kept, and a rerun resumes."""


class Worker:
    """One loaded pipeline; ``run(job)`` → a plain dict (picklable, and a Ray Data row)."""

    def __init__(self, folder: str, threads: int | None, available_mb: float | None = None):
        import engine

        self.error = ""
        self.name = f"{os.uname().nodename}:{os.getpid()}"
        try:
            self.pipe = engine.load_pipeline(folder, threads=threads, available_mb=available_mb)
        except engine.EngineError as exc:  # said once per job: the driver reports it and exits non-zero
            self.pipe, self.error = None, f"the model did not load: {exc}"

    def run(self, job: dict) -> dict:
        from engine import EngineError
        from registry import cache as step_cache
        from registry.manifest import ManifestError
        from registry.policy import InputError

        out = {"id": job["id"], "worker": self.name, "error": self.error, "image": b"", "shape": "[]"}
        out.update(parameters="{}", warnings="[]", seconds=0.0)
        if self.pipe is None:
            return out
        start = time.perf_counter()
        cascade = {key: job[key] for key in ("steps_2", "steps_3") if job.get(key) is not None}
        try:
            result = self.pipe.generate(
                **cascade,
                prompt=job["prompt"],
                negative_prompt=job["negative"],
                steps=job["steps"],
                guidance=job["guidance"],
                width=job["width"],
                height=job["height"],
                seed=job["seed"],
                scheduler=job["scheduler"],
                cache=step_cache.parse(job.get("cache")),
            )
        except (EngineError, InputError, ManifestError) as exc:
            out["error"] = str(exc)
            return out
        image = np.ascontiguousarray(result.image, dtype=np.uint8)
        out.update(
            image=image.tobytes(),
            shape=json.dumps(list(image.shape)),
            parameters=json.dumps(result.parameters),
            warnings=json.dumps(result.warnings),
            seconds=time.perf_counter() - start,
        )
        return out


def image_of(row: dict) -> np.ndarray:
    """The (H, W, 3) uint8 image a worker sent back."""
    return np.frombuffer(row["image"], dtype=np.uint8).reshape(json.loads(row["shape"]))
