"""The batch without Ray: a pool of local processes, each loading the pipeline once (in its initializer) and
running ONNX Runtime on ``threads`` threads, so that workers x threads = the cores."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from .worker import BatchStopped, Worker

_worker: Worker | None = None  # the pool process's one pipeline


def _load(folder: str, threads: int | None, available_mb: float | None) -> None:
    global _worker
    _worker = Worker(folder, threads, available_mb)


def _run(job: dict) -> dict:
    return _worker.run(job)


def default_workers(threads: int) -> int:
    from engine.session import physical_cores

    return max(1, physical_cores() // max(1, threads))


def run_local(folder, jobs: list[dict], *, threads: int, workers: int) -> Iterator[dict]:
    """Each job's result as it finishes (not in order). ``spawn``: a fresh interpreter per worker, never a
    fork of a process that holds threads (ONNX Runtime's, or Ray's in the same process)."""
    from registry.machine import available_memory_mb

    have = available_memory_mb()
    share = have / workers if have else None  # each worker plans its memory within its share
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_load, initargs=(str(folder), threads, share))
    try:
        pending = {pool.submit(_run, job) for job in jobs}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
    except BrokenProcessPool:
        raise BatchStopped(
            "a worker process died (out of memory? try fewer --workers); the finished images are kept: rerun to resume"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
