"""Per-step timing: what every denoising step cost, and everything around the loop."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from contextlib import contextmanager


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


class Profiler:
    def __init__(self):
        self.sections: dict[str, float] = {}
        self.steps: list[dict] = []
        self.started = time.perf_counter()
        self.cache_steps: list[str] | None = None  # a step cache's verdict per step (engine/cache.py)

    def watch_cache(self, verdicts: list[str]) -> None:
        """Mark each step with the step cache's verdict, ``computed`` or ``cached``, as the list fills."""
        self.cache_steps = verdicts

    def steps_computed(self) -> str:
        computed = sum(1 for s in self.steps if s.get("cache") == "computed")
        return f"{computed} of {len(self.steps)}"

    @contextmanager
    def section(self, name: str):
        start = time.perf_counter()
        yield
        self.sections[name] = self.sections.get(name, 0.0) + (time.perf_counter() - start) * 1000

    def add(self, name: str, ms: float) -> None:
        self.sections[name] = self.sections.get(name, 0.0) + ms

    def on_step(self, step) -> None:
        """The sampling callback (engine/sampling.py): one row per step."""
        self.steps.append(
            {
                "index": step.index,
                "timestep": float(step.timestep),
                "sigma": None if step.sigma is None else float(step.sigma),
                "denoiser_ms": round(step.denoiser_ms, 3),
                "scheduler_ms": round(step.scheduler_ms, 3),
            }
        )
        if self.cache_steps is not None and step.index < len(self.cache_steps):
            self.steps[-1]["cache"] = self.cache_steps[step.index]

    def result(self) -> dict:
        step_ms = [s["denoiser_ms"] + s["scheduler_ms"] for s in self.steps]
        # a full evaluation's time (what estimates multiply): the computed steps' when a cache skipped some
        full = [ms for ms, s in zip(step_ms, self.steps, strict=True) if s.get("cache", "computed") == "computed"]
        cached = {}
        if self.cache_steps is not None:
            counts = {"computed": len(full)}
            for s in self.steps:
                if s.get("cache", "computed") != "computed":
                    counts[s["cache"]] = counts.get(s["cache"], 0) + 1
            cached["cache_steps"] = counts
        return {
            "steps": self.steps,
            # sessions created before the run (resident) and inside it (phased): load_ms counts both,
            # total_ms neither, so totals compare across policies
            "load_ms": round(self.sections.get("load", 0.0) + self.sections.get("phase_load", 0.0), 3),
            "text_encoder_ms": round(self.sections.get("text_encoder", 0.0), 3),
            "vae_encode_ms": round(self.sections.get("vae_encode", 0.0), 3),
            "vae_decode_ms": round(self.sections.get("vae_decode", 0.0), 3),
            "total_ms": round((time.perf_counter() - self.started) * 1000 - self.sections.get("phase_load", 0.0), 3),
            "mean_step_ms": round(statistics.fmean(step_ms), 3) if step_ms else 0.0,
            "median_step_ms": round(statistics.median(step_ms), 3) if step_ms else 0.0,
            "median_full_step_ms": round(statistics.median(full), 3) if full else 0.0,
            **cached,
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }


def format_profile(p: dict) -> str:
    staged = any("stage" in s for s in p["steps"])  # a cascade (DeepFloyd IF): each row says its stage
    marked = any("cache" in s for s in p["steps"])  # a step cache: each row says computed/cached/predicted
    head = f"{'stage':>5}  " if staged else ""
    lines = [f"{head}{'step':>4}  {'timestep':>10}  {'sigma':>8}  {'denoiser ms':>11}  {'scheduler ms':>12}"]
    if marked:
        lines[0] += f"  {'denoiser':>8}"
    for s in p["steps"]:
        sigma = "-" if s["sigma"] is None else f"{s['sigma']:.4f}"
        stage = f"{s.get('stage', ''):>5}  " if staged else ""
        lines.append(
            f"{stage}{s['index']:>4}  {s['timestep']:>10.3f}  {sigma:>8}  {s['denoiser_ms']:>11.1f}  "
            f"{s['scheduler_ms']:>12.2f}" + (f"  {s.get('cache', ''):>8}" if marked else "")
        )
    for stage in p.get("stages") or ():
        lines.append(
            f"stage {stage['stage']} ({stage['size']})  {stage['steps']} steps, "
            f"median {stage['median_step_ms'] / 1000:.3f} s/step, {stage['total_ms'] / 1000:.2f} s"
        )
    if "cache_steps" in p:
        done = dict(p["cache_steps"])
        rest = ", ".join(f"{n} {label}" for label, n in done.items() if label != "computed")
        lines.append(f"step cache         {done['computed']} steps computed in full, {rest or 'none skipped'}")
    lines += [
        f"text encoding      {p['text_encoder_ms']:>10.1f} ms",
        # a cascade decodes only in its upscaler stage (DeepFloyd IF's stage III)
        *(
            [f"VAE decode         {p['vae_decode_ms']:>10.1f} ms"]
            if not p.get("stages") or p.get("vae_decode_ms")
            else []
        ),
        *([f"VAE encode         {p['vae_encode_ms']:>10.1f} ms"] if p.get("vae_encode_ms") else []),
        f"model load         {p['load_ms']:>10.1f} ms",
        f"total              {p['total_ms']:>10.1f} ms",
        f"mean per step      {p['mean_step_ms'] / 1000:>10.3f} s",
        f"median per step    {p['median_step_ms'] / 1000:>10.3f} s",
        f"peak resident      {p['peak_rss_mb']:>10.1f} MB",
    ]
    return "\n".join(lines)


class StepBar:
    """A one-line progress display on stderr (only when stderr is a terminal): the phase at once (loading,
    encoding, denoising, decoding), then each step with its time and the ETA of the steps left."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.start = time.perf_counter()

    def _write(self, text: str, end: str = "") -> None:
        if self.enabled:
            sys.stderr.write(f"\r\033[K  {text}{end}")
            sys.stderr.flush()

    def phase(self, name: str) -> None:
        self._write(f"{name} …")

    def clear(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    def begin_steps(self, total: int) -> None:
        self.total, self.start = total, time.perf_counter()
        self._write(f"[{'.' * 30}] step 0/{total}")

    def on_step(self, step) -> None:
        """The sampling callback (engine/sampling.py)."""
        self.update(step.index + 1)

    def update(self, done: int):
        width = 30
        filled = int(width * done / self.total)
        per = (time.perf_counter() - self.start) / done if done else 0.0
        eta = per * (self.total - done)
        text = f"[{'#' * filled}{'.' * (width - filled)}] step {done}/{self.total} {per:.2f} s/step"
        self._write(text + (f", ~{eta:.0f} s left" if done < self.total else ""), "\n" if done == self.total else "")
