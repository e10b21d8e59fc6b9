"""One engine per process: its peak resident memory is its own, and a crash or an out-of-memory kill takes
down one engine, not the benchmark. The parent sends (command, args) and receives (seconds, result)."""

from __future__ import annotations

import multiprocessing as mp
import resource
import time
import traceback


def _peak_rss_mb() -> float:
    # VmHWM is this process image's own high-water mark; ru_maxrss would carry the parent's over the spawn
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _serve(conn, kind: str, options: dict) -> None:
    try:
        from .engines import make

        t0 = time.perf_counter()
        engine = make(kind, **options)
        conn.send(("ready", time.perf_counter() - t0, _peak_rss_mb()))
    except BaseException:  # noqa: BLE001 - reported to the parent, which decides
        conn.send(("error", traceback.format_exc(), None))
        return
    try:
        while True:
            command, args = conn.recv()
            if command == "stop":
                conn.send(("stopped", 0.0, _peak_rss_mb()))
                return
            try:
                t0 = time.perf_counter()
                result = getattr(engine, command)(*args)
                conn.send(("ok", time.perf_counter() - t0, result))
            except (BrokenPipeError, EOFError):
                raise
            except BaseException:  # noqa: BLE001
                conn.send(("error", traceback.format_exc(), None))
    except (BrokenPipeError, EOFError):  # the parent has gone (finished or interrupted): nothing to report to
        return


class WorkerError(RuntimeError):
    pass


class Worker:
    """A started engine process. ``call`` blocks until the engine answers: only one engine runs at a time."""

    def __init__(self, name: str, kind: str, options: dict):
        self.name = name
        context = mp.get_context("spawn")  # no forked copies of torch/onnxruntime thread pools
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, kind, options), daemon=True)
        self.process.start()
        self.load_s: float | None = None
        self.peak_rss_mb: float | None = None

    def wait_ready(self) -> None:
        status, value, rss = self._receive()
        if status != "ready":
            raise WorkerError(f"{self.name} failed to load:\n{value}")
        self.load_s, self.peak_rss_mb = value, rss

    def _receive(self):
        while not self.conn.poll(5):
            if not self.process.is_alive():
                raise WorkerError(f"{self.name} died (exit code {self.process.exitcode}; out of memory?)")
        return self.conn.recv()

    def call(self, command: str, *args):
        """(seconds, result) of one engine call."""
        self.conn.send((command, args))
        status, seconds, result = self._receive()
        if status != "ok":
            raise WorkerError(f"{self.name}.{command} failed:\n{seconds}")
        return seconds, result

    def stop(self) -> float | None:
        """Ends the process; returns its peak resident memory in MB."""
        try:
            self.conn.send(("stop", ()))
            status, _, rss = self._receive()
            self.peak_rss_mb = rss
        except (WorkerError, OSError, EOFError):
            pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
        return self.peak_rss_mb
