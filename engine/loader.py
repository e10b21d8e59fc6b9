"""The graphs of one export, loaded under a load policy (engine/memory.py), safe to share between threads.

``resident``: every session is created up front and kept. ``phased``: a phase acquires its sessions (created
on first use) and releases them when it ends; a session is dropped when no running phase uses it, so two
generations in flight never lose a session the other still runs. Runtimes are swapped through
``graph_factory`` (the benchmark's OpenVINO graphs), not by patching this module.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .memory import PHASED, RESIDENT
from .session import Graph

GraphFactory = Callable[[Path, "int | None"], object]


class Sessions:
    def __init__(
        self,
        paths: dict[str, Path],
        *,
        threads: int | None = None,
        policy: str = RESIDENT,
        graph_factory: GraphFactory = Graph,
        lazy: list[str] = (),
    ):
        """``lazy``: graphs no phase runs by default (the denoiser's other form: whole or split for a step
        cache), created when a generation first asks for them even when resident, and kept then."""
        self.paths, self.threads, self.policy, self.factory = dict(paths), threads, policy, graph_factory
        self._lock = threading.Lock()
        self._graphs: dict[str, object] = {}
        self._users: dict[str, int] = {}
        self.load_ms = 0.0  # what creating the resident sessions took
        if policy == RESIDENT:
            start = time.perf_counter()
            for name in (n for n in self.paths if n not in lazy):
                self._graphs[name] = self.factory(self.paths[name], threads)
            self.load_ms = (time.perf_counter() - start) * 1000

    def __contains__(self, name: str) -> bool:
        return name in self.paths

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._graphs)

    @contextmanager
    def phase(self, names: list[str], on_load: Callable[[float], None] | None = None) -> Iterator[dict]:
        """The sessions of ``names`` for the duration of the block; ``on_load(ms)`` gets the time spent
        creating sessions for it (0 when all were loaded already)."""
        names = [n for n in names if n in self.paths]
        start = time.perf_counter()
        with self._lock:  # one loader at a time: two threads never create the same session twice
            for name in names:
                if name not in self._graphs:
                    self._graphs[name] = self.factory(self.paths[name], self.threads)
                self._users[name] = self._users.get(name, 0) + 1
            graphs = {name: self._graphs[name] for name in names}
        if on_load is not None:
            on_load((time.perf_counter() - start) * 1000)
        try:
            yield graphs
        finally:
            with self._lock:
                for name in names:
                    self._users[name] -= 1
                    if self.policy == PHASED and self._users[name] == 0:
                        del self._graphs[name]  # the session (and its weights) go with the last reference
            del graphs
