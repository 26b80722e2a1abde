"""What holds Python's GIL: a probe thread that runs Python without pause, as a GPU's training loop
does, and measures how long it waited for the GIL; and the serial part of a read it implies."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np


class GilProbe:
    """A thread that runs Python without pause, as a GPU training loop does, and measures how long
    it waited for the GIL: its wall time less its time on a CPU and waiting for one (Linux
    schedstat), i.e. the time other threads held the GIL while it wanted it."""

    def __init__(self):
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.blocked = self.wall = 0.0

    def _schedstat(self) -> tuple[float, float]:
        run, queued, _ = open(f"/proc/self/task/{self._tid}/schedstat").read().split()
        return int(run) / 1e9, int(queued) / 1e9

    def _spin(self) -> None:
        self._tid = threading.get_native_id()
        began, (run0, queued0) = time.perf_counter(), self._schedstat()
        self._ready.set()
        n = 0
        while not self._stop.is_set():
            for _ in range(1000):
                n += 1
        (run1, queued1), self.wall = self._schedstat(), time.perf_counter() - began
        self.blocked = max(0.0, self.wall - (run1 - run0) - (queued1 - queued0))

    def __enter__(self) -> GilProbe:
        self._thread = threading.Thread(target=self._spin, name="gil-probe")
        self._thread.start()
        self._ready.wait()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def untrained_read(store: Path, threads: int):
    """(reader, read) for the untrained slice of embeddings over every step, read on ``threads``
    threads into an output whose pages are faulted in once already; ``read()`` reads it again."""
    from wordystore.read import reading
    from wordystore.store import storage

    reader = reading.StoreReader.open(storage.as_store(store, read_only=True), cache_bytes=0, threads=threads)
    ids = reader.read_token_set("untrained")
    kind = reader.meta.kinds["embeddings"]
    rows = reader.record.committed_rows
    out = np.empty((rows, len(ids), *kind.shape[1:]), kind.numpy_dtype)
    fetch = (slice(0, rows, 1), ids, *(slice(0, n, 1) for n in kind.shape[1:]))

    def read() -> None:
        reader.read_into("embeddings", fetch, out)

    read()
    return reader, read


def read_serial_part(store: Path) -> tuple[float, float]:
    """The untrained slice read on one reader thread: the share of its time the reader held the GIL
    (what more threads cannot overlap), and the read's seconds."""
    reader, read = untrained_read(store, 1)
    with GilProbe() as gil:
        began = time.perf_counter()
        read()
        seconds = time.perf_counter() - began
    reader.close()
    return min(1.0, gil.blocked / seconds), seconds
