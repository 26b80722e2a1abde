"""How many threads a writer's pools get, at what priority, where they run, and how many rows its
ring holds: sized to the machine with the training process's own threads first.

A writer runs two pools beside the training loop (docs/architecture.md, "Pools"):

- **write threads** store the hot shards of each block;
- **compaction threads** encode the main tier's long chunks.

Both are pools of :class:`IdlePool`: their threads run on idle CPU time only (Linux ``SCHED_IDLE``:
when a core would otherwise idle), so training never waits for them. When they fall behind (the
machine has too little idle time), the thread that must wait for them, an append or ``close()``,
runs their queued tasks itself at its own priority: backpressure turns into the training thread
doing the writer's work, counted in ``writer.stats()``. By default they run in a child process
instead (:mod:`wordystore.write.child_process`), away from the training process's GIL: on idle CPU
time there too when the CPU trains, at nice 10 when a GPU does (its cores are free); in the
training process only where no child can run (object storage, no room in ``/dev/shm``, or
``WORDYSTORE_WRITER_PROCESS=0``).

:meth:`WriterPools.for_machine` sizes them from the CPUs this process may run on
(``os.sched_getaffinity``), the threads training keeps busy (``torch.get_num_threads()`` when
training on the CPU, one Python thread when a GPU does the work) and the environment variables
``WORDYSTORE_WRITE_THREADS``, ``WORDYSTORE_COMPACTION_THREADS`` and ``WORDYSTORE_WRITER_PROCESS``;
arguments to :func:`wordystore.create` override them. The choice goes into every commit record
(``commit.json``'s ``writer``; ``wordystore info`` shows it)."""

from __future__ import annotations

import collections
import os
import threading
from concurrent.futures import Future, wait
from dataclasses import dataclass

import torch

WRITE_THREADS_ENV = "WORDYSTORE_WRITE_THREADS"
COMPACTION_THREADS_ENV = "WORDYSTORE_COMPACTION_THREADS"
PROCESS_ENV = "WORDYSTORE_WRITER_PROCESS"
MAX_WRITE_THREADS = 4  # a block's hot shards are plain copies and a checksum: 4 threads fill a fast disk
# A row's bytes from which the pools run in a child process by default: a child costs a process start
# (torch imported, a second or two) and a message per block, and saves the GIL the pools would hold in
# the training process for each row, which grows with the row's bytes. Small rows (tests, examples, a
# tiny model) stay in-process; the seed's 26 MB rows go to a child.
CHILD_MIN_ROW_BYTES = 8 << 20
GPU_RING_BLOCKS = 3  # blocks the ring holds when a GPU feeds it: one being written, two to fill meanwhile


@dataclass(frozen=True)
class WriterPools:
    """A writer's threads and ring size, and the machine they were sized for."""

    write_threads: int
    compaction_threads: int  # 0: compact only at close
    ring_blocks: int  # the ring holds ``ring_blocks`` blocks and one row more
    sized_for: str  # the machine as the sizing saw it, for ``info``
    process: bool = (
        False  # the pools run in a child process (wordystore.write.child_process), not beside training's Python
    )

    def __post_init__(self):
        for name in ("write_threads", "ring_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        value = self.compaction_threads
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"compaction_threads must be an int >= 0 (0: compact at close only), got {value!r}")

    @classmethod
    def for_machine(
        cls,
        write_threads: int | None = None,
        compaction_threads: int | None = None,
        process: bool | None = None,
        gpu: bool | None = None,
        row_bytes: int | None = None,
    ) -> WriterPools:
        """Pools for this machine: training's threads first, then the writer's. ``gpu`` (default:
        whether CUDA is available) says whether a GPU trains, leaving the CPU's cores but one free
        and the training loop Python-bound. The pools run in a child ``process`` by default where a
        GPU trains or a row (``row_bytes``, every kind's bytes of one step; unknown: None) is at least
        :data:`CHILD_MIN_ROW_BYTES`: the writer's Python then never holds training's GIL
        (``WORDYSTORE_WRITER_PROCESS=0`` or ``1`` decides otherwise)."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        gpu = torch.cuda.is_available() if gpu is None else gpu
        training = 1 if gpu else min(cores, torch.get_num_threads())
        free = max(1, cores - training)
        write = _threads(write_threads, WRITE_THREADS_ENV, min(MAX_WRITE_THREADS, free))
        # Compaction takes idle time only. On a GPU host that is every core but training's; on a
        # CPU, slices of both cores that one thread takes in turn (each more holds a tile of rows
        # in memory: the writer's budget is about 300 MB beside its 230 MB ring).
        compact = _threads(compaction_threads, COMPACTION_THREADS_ENV, free if gpu else 1, allow_zero=True)
        child = _flag(process, PROCESS_ENV, gpu or row_bytes is None or row_bytes >= CHILD_MIN_ROW_BYTES)
        sized_for = f"{cores} cores, {training} for {'GPU' if gpu else 'CPU'} training"
        return cls(write, compact, GPU_RING_BLOCKS if gpu else 1, sized_for, child)

    def close_threads(self) -> int:
        """Threads compacting what is left at close, or writing a whole store: every core (training
        is over, and the ring's memory is freed first)."""
        return max(
            self.compaction_threads,
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
        )

    def describe(self) -> str:
        def n(count: int, what: str) -> str:
            return f"{count} {what}{'' if count == 1 else 's'}"

        compaction = (
            n(self.compaction_threads, "compaction thread") if self.compaction_threads else "compaction at close"
        )
        where = "in a child process" if self.process else "beside training"
        return (
            f"{n(self.write_threads, 'write thread')}, {compaction} {where}, a ring of "
            f"{n(self.ring_blocks, 'block')} ({self.sized_for})"
        )

    def to_dict(self) -> dict:
        return {
            "write_threads": self.write_threads,
            "compaction_threads": self.compaction_threads,
            "ring_blocks": self.ring_blocks,
            "sized_for": self.sized_for,
            "process": self.process,
        }

    @classmethod
    def from_dict(cls, doc: dict) -> WriterPools:
        return cls(
            int(doc["write_threads"]),
            int(doc["compaction_threads"]),
            int(doc["ring_blocks"]),
            str(doc.get("sized_for", "")),
            bool(doc.get("process", False)),
        )


def _threads(given: int | None, env: str, default: int, allow_zero: bool = False) -> int:
    """``given``, else the environment variable ``env`` if set, else ``default``."""
    if given is not None:
        return given
    text = os.environ.get(env, "").strip()
    if not text:
        return default
    if not text.isdecimal() or (int(text) == 0 and not allow_zero):
        raise ValueError(
            f"{env}={text!r}: expected a whole number of threads ({'0 or more' if allow_zero else '1 or more'})"
        )
    return int(text)


class IdlePool:
    """A thread pool whose threads run on idle CPU time only (with ``idle``; else at the process's
    priority), and whose queued tasks any other thread may run itself, at its own priority
    (:meth:`help_until`). ``submit`` returns a :class:`concurrent.futures.Future`, as an
    executor's does."""

    def __init__(self, threads: int, name: str, idle: bool = True):
        self._queue: collections.deque = collections.deque()  # (future, fn, args), oldest first
        self._cv = threading.Condition()
        self._closed, self._idle = False, idle
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn, *args) -> Future:
        future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("submit to a pool that was shut down")
            self._queue.append((future, fn, args))
            self._cv.notify()
        return future

    def run_one(self) -> bool:
        """Run the oldest queued task in the calling thread; False if none was queued."""
        with self._cv:
            if not self._queue:
                return False
            item = self._queue.popleft()
        _run(*item)
        return True

    def help_until(self, futures) -> None:
        """Run queued tasks in the calling thread until every one of ``futures`` is done."""
        futures = [f for f in futures if f is not None]
        while not all(f.done() for f in futures):
            if not self.run_one():
                wait(futures, timeout=0.01)  # nothing queued: the pool's own threads hold the rest

    def shutdown(self) -> None:
        """Run what is still queued (in the calling thread too), then end the threads."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        while self.run_one():
            pass
        for thread in self._threads:
            thread.join()

    def _work(self) -> None:
        if self._idle:
            idle_only()
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return
                item = self._queue.popleft()
            _run(*item)
            del item  # its arguments (a block's rows in the ring, a tile) go now, not at the next task


def _run(future: Future, fn, args) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn(*args))
    except BaseException as exc:
        future.set_exception(exc)


def _flag(given: bool | None, env: str, default: bool) -> bool:
    """``given``, else the environment variable ``env`` (0 or 1) if set, else ``default``."""
    if given is not None:
        return given
    text = os.environ.get(env, "").strip()
    if text not in ("", "0", "1"):
        raise ValueError(f"{env}={text!r}: expected 0 (the writer's pools beside training) or 1 (in a child process)")
    return default if not text else text == "1"


def yield_to_training(niceness: int) -> None:
    """Pool initializer: lower the calling thread's CPU priority (Linux sets it per thread;
    elsewhere nothing)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):
        pass


def idle_only() -> None:
    """Pool initializer: run the calling thread on idle CPU time only (Linux ``SCHED_IDLE``;
    elsewhere the lowest niceness)."""
    try:
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        yield_to_training(19)
