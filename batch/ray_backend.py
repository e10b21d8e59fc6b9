"""The batch on Ray: Ray Data ``map_batches`` over actors that each load the pipeline once, each asking Ray for
as many CPUs as ONNX Runtime runs threads, so the cluster's cores are not oversubscribed.

Ray is imported here only (the ``ray`` extra: ``pip install -e '.[ray]'``); the runtime install has none.
``--ray auto`` joins the cluster this machine belongs to (``RAY_ADDRESS``, or the last ``ray start`` here)
and starts a local one when there is none; ``--ray ADDRESS`` joins that one (``HOST:6379`` from a node of
the cluster, ``ray://HOST:10001`` from outside). Stepwise's own packages travel with the job
(``runtime_env`` ``py_modules``); every node needs the runtime (``pip install stepwise[ray]``) and the
exported model at the same path (or on a shared disk).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

from registry.policy import InputError

from .worker import BatchStopped, Worker

CODE = ("batch", "engine", "registry", "schedulers", "serve")  # what a worker imports: shipped to every node
ROOT = Path(__file__).resolve().parents[1]
_started = False  # whether connect() called ray.init


def import_ray():
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs the ray extra (ray is not installed): pip install -e '.[ray]'") from None
    return ray


def runtime_env() -> dict:
    """Stepwise's own packages as the driver has them, shipped to the workers of every node."""
    return {"py_modules": [str(ROOT / name) for name in CODE if (ROOT / name).is_dir()]}


def _check_reachable(address: str) -> None:
    """A cluster address that answers nothing fails in seconds here; ray.init would retry for minutes."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--ray {address}: not an address; give HOST:6379, ray://HOST:10001 or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise InputError(
            f"--ray {address}: nothing answers there ({exc.strerror or exc}); start the cluster's head with "
            f"`ray start --head` and give its address, or use --ray auto"
        ) from None


def connect(address: str | None = "auto"):
    """Join (or start) Ray unless this process already did; returns the ray module."""
    global _started
    ray = import_ray()
    if not ray.is_initialized():
        target = None if address in (None, "auto", "local") else address
        if target is not None:
            _check_reachable(target)
        try:
            ray.init(address=target, runtime_env=runtime_env(), logging_level=logging.WARNING)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise InputError(
                f"--ray {address}: cannot join that Ray cluster ({reason}); start one with `ray start --head` "
                f"or give its address (HOST:6379, or ray://HOST:10001)"
            ) from None
        _started = True
    return ray


def disconnect() -> None:
    """Shut down the Ray that ``connect`` started or joined for this batch (not one the caller started)."""
    global _started
    if _started:
        import ray

        ray.shutdown()
        _started = False


class GenerateActor:
    """A Ray Data actor: the pipeline loaded once in ``__init__``, one job per call (``batch_size=1``).
    ``run_ray`` subclasses it with the model's folder and threads as class attributes: no constructor
    arguments, which Ray would keep in its object store for restarts."""

    folder: str = ""
    threads: int | None = None

    def __init__(self):
        self.worker = Worker(self.folder, self.threads)

    def __call__(self, batch):
        import pyarrow as pa

        rows = [self.worker.run(json.loads(text)) for text in batch["job"]]
        return pa.Table.from_pylist(rows)


def _no_restarts() -> dict:
    """A failed actor fails its jobs (a rerun resumes) rather than reloading the model in a loop; and Ray does
    not warn that a restart could lose the constructor's arguments."""
    return {"max_restarts": 0}


def default_actors(ray, threads: int) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1) // max(1, threads)))


def run_ray(folder, jobs: list[dict], *, threads: int, actors: int | None, address: str | None) -> Iterator[dict]:
    """Each job's result as it finishes."""
    ray = connect(address)
    from ray import data

    actors = actors or default_actors(ray, threads)
    context = data.DataContext.get_current()
    context.enable_progress_bars = False  # the batch prints its own
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    actor = type("GenerateActor", (GenerateActor,), {"folder": str(folder), "threads": threads})
    items = [{"job": json.dumps(job)} for job in jobs]
    with warnings.catch_warnings():  # ray_remote_args_fn: deprecated from 2.60, the only way to say max_restarts
        warnings.simplefilter("ignore", DeprecationWarning)
        dataset = data.from_items(items, override_num_blocks=len(items)).map_batches(
            actor,
            compute=data.ActorPoolStrategy(size=actors),
            num_cpus=threads,
            batch_size=1,
            ray_remote_args_fn=_no_restarts,
        )
    try:
        yield from dataset.iter_rows()
    except ray.exceptions.RayError as exc:  # an actor died (out of memory, a node lost): what is saved stays
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise BatchStopped(f"Ray stopped the batch ({reason}); the finished images are kept: rerun to resume") from None
