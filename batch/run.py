"""``stepwise batch``: check every line, skip what is finished, run the rest on a local pool or on Ray, write
each image (atomically, with its metadata) and its results entry as it arrives, then say the throughput."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import click

from registry.policy import InputError

from .jobs import RESULTS, Job, Results, read_jobs
from .worker import image_of


@dataclass
class Summary:
    total: int  # jobs in the file
    skipped: int  # finished by an earlier run
    done: int = 0  # made by this run
    seconds: float = 0.0
    failures: list[tuple[Job, str]] = field(default_factory=list)
    backend: str = ""

    @property
    def per_minute(self) -> float:
        return 60.0 * self.done / self.seconds if self.seconds > 0 else 0.0


def check_out_dir(out: Path, jobs: list[Job]) -> None:
    """Before anything is loaded or written: ``--out`` is (or can become) a writable folder with room."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder for the images, e.g. {out.with_suffix('')}-images")
    folder = out
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: {folder} is not a writable folder; choose a folder you can write to")
    need = sum(j.width * j.height * 3 + 2**16 for j in jobs)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise InputError(
            f"--out {out}: {free / 2**20:.1f} MB free, {need / 2**20:.1f} MB is needed for {len(jobs)} images; "
            f"free some space or write elsewhere"
        )


def run_batch(
    target,
    prompts,
    out,
    *,
    threads: int | None = None,
    workers: int | None = None,
    ray: str | None = None,
    force: bool = False,
    echo=click.echo,
) -> Summary:
    """Raises InputError (one line naming the fix) before anything is written when an input is bad."""
    from engine.session import physical_cores

    out = Path(out)
    jobs = read_jobs(prompts, target, force=force)
    for name, value in (("--threads", threads), ("--workers", workers)):
        if value is not None and value < 1:
            raise InputError(f"{name} must be at least 1 (got {value})")
    check_out_dir(out, jobs)
    results = Results(out)
    todo = [job for job in jobs if not results.finished(job)]
    summary = Summary(total=len(jobs), skipped=len(jobs) - len(todo))
    if summary.skipped:
        echo(f"{summary.skipped} of {len(jobs)} already done ({out / RESULTS}): skipped")
    if not todo:
        echo("nothing left to run")
        return summary
    for job in todo:
        if job.warning:
            click.echo(f"warning: line {job.line}: {job.warning}", err=True)
    cores = physical_cores()
    if threads is None:
        threads = max(1, cores // workers) if workers and ray is None else 1
    rows = [job.as_dict() for job in todo]
    try:
        if ray is None:
            from .local import default_workers, run_local

            workers = min(workers or default_workers(threads), len(todo))
            if workers * threads > (os.cpu_count() or 1):
                click.echo(
                    f"warning: {workers} workers × {threads} threads is more than this machine's "
                    f"{os.cpu_count()} cores: they slow each other down; use --workers {default_workers(threads)}",
                    err=True,
                )
            summary.backend = f"{workers} local worker{'s' * (workers > 1)} × {threads} thread{'s' * (threads > 1)}"
            stream = run_local(target.folder, rows, threads=threads, workers=workers)
        else:  # Ray's own start-up (a local instance) is not counted in the throughput; its actors' is
            from .ray_backend import connect, default_actors, run_ray

            ray_module = connect(ray)
            cpus = int(ray_module.cluster_resources().get("CPU", 0))
            actors = workers or default_actors(ray_module, threads)
            if actors * threads > cpus:
                raise InputError(
                    f"{actors} actors × --threads {threads} need {actors * threads} CPUs and the Ray cluster has "
                    f"{cpus}: they would wait for CPUs for ever; use --actors {max(1, cpus // threads)}"
                    + ("" if threads <= cpus else f" --threads {max(1, cpus)}")
                    + " (or add nodes)"
                )
            actors = min(actors, len(todo))
            summary.backend = f"Ray ({ray}): {actors} actor{'s' * (actors > 1)} × {threads} CPU{'s' * (threads > 1)}"
            stream = run_ray(target.folder, rows, threads=threads, actors=actors, address=ray)
        _write(summary, stream, todo, target, out, results, echo)
    finally:
        if ray is not None:
            from .ray_backend import disconnect

            disconnect()
    return summary


def _write(summary: Summary, stream, todo: list[Job], target, out: Path, results: Results, echo) -> None:
    from engine import save_png

    echo(f"Batch:    {len(todo)} images with {target.label} on {summary.backend} → {out}")
    out.mkdir(parents=True, exist_ok=True)
    by_id = {job.id: job for job in todo}
    extra = {"weights": "random"} if target.random_weights else {}
    start = time.perf_counter()
    bar = click.progressbar(length=len(todo), label="generating", file=sys.stderr) if sys.stderr.isatty() else None
    try:
        if bar is not None:
            bar.__enter__()
        for count, row in enumerate(stream, start=1):
            job = by_id[row["id"]]
            if row["error"]:
                summary.failures.append((job, row["error"]))
                line = f"line {job.line} failed: {row['error']}"
                if bar is not None:
                    click.echo(f"\nerror: {line}", err=True)
            else:
                result = SimpleNamespace(image=image_of(row), parameters=json.loads(row["parameters"]))
                save_png(result, out / job.file, {**extra, "batch_id": job.id})
                results.add(job, seconds=round(float(row["seconds"]), 3), worker=row["worker"])
                summary.done += 1
                line = f"{job.file} (line {job.line}, {float(row['seconds']):.1f} s)"
                for warning in json.loads(row["warnings"]):
                    click.echo(f"warning: line {job.line}: {warning}", err=True)
            if bar is not None:
                bar.update(1)
            else:
                echo(f"[{count}/{len(todo)}] {line}")
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
        summary.seconds = time.perf_counter() - start
    echo(
        f"{summary.done} images in {summary.seconds:.1f} s: {summary.per_minute:.1f} images/minute "
        f"({summary.backend}, model loads included)"
    )
