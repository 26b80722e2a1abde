"""What a writer does beside the training loop: write each block of rows from the ring to the hot
tier and commit it, compact committed rows into the main tier, and, at close, compact the rest.

:class:`Background` runs it in the writer's own process, on pools sized to the machine
(:mod:`wordystore.pools`); :mod:`wordystore.write.child_process` runs the same object in a child process, so
that the training process's Python never waits for it (a GPU's training loop is Python-bound).
The writer's face (:class:`wordystore.write.writer.TrajectoryWriter`) validates appends, fills the
:class:`Ring` and hands it blocks. Every change of what readers see is one atomic replace of
``commit.json`` made after the data it admits is on disk (docs/format.md, "Commit protocol").
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

import numpy as np
import torch

from wordystore.format.keys import STEPS_ARRAY, document_key
from wordystore.format.kinds import Kind, torch_to_numpy
from wordystore.format.layout import ArrayLayout
from wordystore.format.metadata import Metadata
from wordystore.format.records import CommitRecord
from wordystore.pools import IdlePool, WriterPools, yield_to_training
from wordystore.read import reading
from wordystore.store import json_documents, storage
from wordystore.store.resume_state import ResumeState
from wordystore.write import compaction
from wordystore.write.compaction import TileReader

RING_ALIGN = 64  # bytes: each array of the ring starts on a cache line


class Ring:
    """Host buffers for the rows not yet written whole: row ``r`` of every array lives in slot
    ``r % capacity``. One flat byte buffer holds every array (so that another process can map it:
    :mod:`wordystore.write.child_process`), seen as torch tensors (to copy rows in) and numpy arrays (to write
    them out)."""

    def __init__(self, buffer: torch.Tensor, arrays: dict[str, Kind], capacity: int):
        self.capacity = capacity
        self.buffer = buffer  # uint8, ``Ring.nbytes(arrays, capacity)`` long
        self.slots = {
            name: buffer[offset : offset + size].view(kind.torch_dtype).view(capacity, *kind.shape)
            for name, (kind, offset, size) in _places(arrays, capacity).items()
        }
        self._views = {name: torch_to_numpy(slots) for name, slots in self.slots.items()}  # the same memory

    @staticmethod
    def nbytes(arrays: dict[str, Kind], capacity: int) -> int:
        return max((offset + size for _, offset, size in _places(arrays, capacity).values()), default=0)

    @classmethod
    def allocate(cls, arrays: dict[str, Kind], capacity: int, pin: bool) -> Ring:
        """A ring in this process's memory; ``pin``: page-locked, so that copies from a GPU run
        asynchronously."""
        return cls(torch.empty(cls.nbytes(arrays, capacity), dtype=torch.uint8, pin_memory=pin), arrays, capacity)

    def put(self, row: int, values: dict[str, torch.Tensor]) -> None:
        slot = row % self.capacity
        for name, value in values.items():
            self.slots[name][slot].copy_(value, non_blocking=True)

    def runs(self, name: str, first: int, n: int) -> list[np.ndarray]:
        """Rows ``[first, first + n)`` of array ``name`` as views of the ring, in order: one run, or
        two where they wrap around its end."""
        start, view = first % self.capacity, self._views[name]
        if start + n <= self.capacity:
            return [view[start : start + n]]
        return [view[start:], view[: start + n - self.capacity]]


def _places(arrays: dict[str, Kind], capacity: int) -> dict[str, tuple[Kind, int, int]]:
    """(kind, byte offset, bytes) of every array's slots in a ring's buffer."""
    places, offset = {}, 0
    for name, kind in arrays.items():
        size = capacity * math.prod(kind.shape) * kind.numpy_dtype.itemsize
        places[name] = (kind, offset, size)
        offset += -(-size // RING_ALIGN) * RING_ALIGN
    return places


class Background:
    """The writer's work beside the training loop, for one store: a committer thread that has the
    write threads store each block's hot shards in parallel and then commits the block, and
    compaction, a chunk of rows at a time as soon as it is committed whole.

    With ``idle``, the write and compaction threads run on idle CPU time only, and a thread that
    waits for them (an append under backpressure, ``close``) runs their queued tasks itself; else
    (a child process of its own) at the process's priority."""

    def __init__(
        self,
        store,
        meta: Metadata,
        record: CommitRecord,
        layouts: dict[str, tuple[ArrayLayout, ArrayLayout]],
        ring: Ring,
        durable: bool,
        keep_states: int,
        pools: WriterPools,
        idle: bool = True,
    ):
        self._store, self._meta, self.ring = store, meta, ring
        self.durable, self._keep_states, self.pools = durable, keep_states, pools
        self.chunk_rows = meta.chunk_rows
        self._record = dataclasses.replace(record, writer=pools.to_dict())  # recorded with its commits
        self._record_lock = threading.Lock()
        self._main = {name: main for name, (main, _) in layouts.items()}
        self._hot = {name: hot for name, (_, hot) in layouts.items()}
        # One thread orders the blocks' commits and another the compaction's (nice 10: they mostly
        # wait); the shards are stored and encoded by the pools (wordystore.pools).
        self._committer = ThreadPoolExecutor(1, "wordystore-commit", initializer=yield_to_training, initargs=(10,))
        self._writers = IdlePool(pools.write_threads, "wordystore-write", idle)
        # Compaction starts as soon as a chunk of rows is committed whole; its condition is notified
        # at every commit (waits for compaction wait on it).
        self._compaction_cv = threading.Condition()
        self._compacting = self._compaction_stop = False
        self._compaction: Future | None = None
        self._coordinator = self._compactors = None
        if pools.compaction_threads:
            self._coordinator = ThreadPoolExecutor(
                1, "wordystore-compaction", initializer=yield_to_training, initargs=(10,)
            )
            self._compactors = IdlePool(pools.compaction_threads, "wordystore-compact", idle)
        self._deletions: list[Future] = []
        self._failed = False  # a block failed: later ones must not commit past it
        self.on_commit: Callable[[CommitRecord], None] | None = None  # called after every commit
        # called with the exception when the background compaction fails (a child process reports it:
        # its parent's appends, waiting for compaction, would otherwise wait for ever)
        self.on_compaction_failure: Callable[[BaseException], None] | None = None
        # Rows a killed writer committed whole but did not compact (a resume) are compacted from now
        # on, not from this writer's first commit: a writer's appends wait for compaction when it is
        # two chunks behind, and in a child process they cannot see whether it runs.
        self._start_compaction()

    @property
    def record(self) -> CommitRecord:
        """The latest commit record."""
        return self._record

    def reader(self) -> reading.StoreReader:
        """A reader of the committed rows, in this writer's layouts (one thread, no cache)."""
        return self._reader(self._record)

    # -- blocks ----------------------------------------------------------------------------------

    def write_block(self, first: int, n: int, state: ResumeState | None, cuda_event=None) -> Future:
        """Write rows ``[first, first + n)`` from the ring to the hot tier and commit them (with
        ``state``, the run's resume state after the last of them); the future is done once they
        are committed. ``cuda_event``: wait for it before reading the ring (copies from a GPU)."""
        return self._committer.submit(self._write_block, first, n, state, cuda_event)

    def help_until(self, future: Future) -> None:
        """Wait for a block, running its queued shards in the calling thread."""
        self._writers.help_until([future])

    def wait_ready(self) -> None:
        """Nothing to wait for: the threads start at once (a child process does not: remote)."""

    def _write_block(self, first: int, n: int, state: ResumeState | None, cuda_event) -> None:
        """Committer thread: the block's shards in parallel on the write threads, then the hot
        arrays' documents, the state, fsync, the commit."""
        if self._failed:
            raise RuntimeError(f"not writing rows {first}..{first + n - 1}: an earlier block failed")
        try:
            self._write_block_now(first, n, state, cuda_event)
        except BaseException:
            self._failed = True
            raise

    def _write_block_now(self, first: int, n: int, state: ResumeState | None, cuda_event) -> None:
        if cuda_event is not None:  # the copies from the GPU into these slots are complete
            cuda_event.synchronize()
        end = first + n
        layouts = {name: hot.with_rows(max(end, hot.shape[0])) for name, hot in self._hot.items()}
        _all_results(
            [
                self._writers.submit(
                    compaction.write_hot_shard,
                    self._store,
                    layout,
                    coords,
                    self.ring.runs(name, first, n),
                    self.durable,
                )
                for name, layout in layouts.items()
                for coords in compaction.block_shards(layout, first)
            ]
        )
        written = []
        for layout in layouts.values():
            json_documents.write_layout(self._store, layout)
            written.append(document_key(layout.path))
        self._hot = layouts
        entry = None
        if state is not None:
            data = state.encode()
            storage.put(self._store, state.key, data)
            written.append(state.key)
            entry = state.entry(data)
        if self.durable:
            storage.sync_to_disk(self._store, written)  # the shards synced themselves
        last_step = int(self.ring.runs(STEPS_ARRAY, end - 1, 1)[0][0])
        self._commit_with_state(entry, committed_rows=end, last_step=last_step)
        self._start_compaction()

    def keep_state(self, state: ResumeState) -> None:
        """Keep ``state``, the state of the last committed row, with a commit of its own (the
        writer checks that it is that row's)."""
        data = state.encode()
        storage.put(self._store, state.key, data)
        if self.durable:
            storage.sync_to_disk(self._store, [state.key])
        self._commit_with_state(state.entry(data))

    def _commit(self, **changes) -> None:
        """Replace the commit record (the committer and compaction go through here, one at a time),
        and wake whoever waits for compaction."""
        with self._record_lock:
            self._record = dataclasses.replace(self._record, **changes)
            json_documents.write_commit(self._store, self._record, durable=self.durable)
            if self.on_commit is not None:
                self.on_commit(self._record)
        with self._compaction_cv:
            self._compaction_cv.notify_all()

    def _commit_with_state(self, entry: dict | None, **changes) -> None:
        """Commit ``changes`` with the state ``entry`` names (None: none) kept too; the states past
        ``keep_states`` are dropped from the record, then their files deleted."""
        states = self._record.states + ((entry,) if entry else ())
        self._commit(states=states[-self._keep_states :], **changes)
        for old in states[: -self._keep_states]:
            storage.delete(self._store, old["key"])

    def _reader(self, record: CommitRecord) -> reading.StoreReader:
        layouts = {name: (self._main[name], self._hot[name]) for name in self._main}
        return reading.StoreReader(self._store, self._meta, record, layouts, threads=1)

    # -- the main tier ---------------------------------------------------------------------------

    def bulk_append(self, steps: np.ndarray, read_tile: TileReader, progress=None) -> None:
        """Rows straight into the main tier, a chunk of rows at a time on every core (the record
        must have every row compacted on a chunk boundary: the writer checks)."""
        first = self._record.committed_rows

        def shifted(name: str, fetch: tuple, out: np.ndarray) -> None:
            rows = slice(fetch[0].start - first, fetch[0].stop - first, 1)
            if name == STEPS_ARRAY:
                out[...] = steps[rows]
            else:
                read_tile(name, (rows, *fetch[1:]), out)

        with ThreadPoolExecutor(self.pools.close_threads()) as pool:
            for start in range(first, first + len(steps), self.chunk_rows):
                stop = min(start + self.chunk_rows, first + len(steps))
                self._main = compaction.write_main_rows(
                    self._store, self._main, self._meta.arrays(), shifted, start, stop, pool, self.durable
                )
                self._commit(committed_rows=stop, compacted_rows=stop, last_step=int(steps[stop - first - 1]))
                if progress is not None:
                    progress(stop - start)

    def wait_for_compaction(self, limit: int) -> None:
        """Wait while ``limit`` or more committed rows are not compacted and compaction runs,
        running its queued shards in the calling thread; raise its failure if it failed."""
        while self._compacting and self._record.committed_rows - self._record.compacted_rows >= limit:
            if not self._compactors.run_one():
                with self._compaction_cv:
                    self._compaction_cv.wait(0.01)
        if self._compaction is not None and self._compaction.done():
            self._compaction.result()

    def _start_compaction(self) -> None:
        """After a commit: start compacting if a chunk of rows is committed whole (not after a
        compaction failed: the writer reports that failure, and stops)."""
        failed = self._compaction is not None and self._compaction.done() and self._compaction.exception() is not None
        if self._coordinator is None or failed:
            return
        with self._compaction_cv:
            if not (self._compacting or self._compaction_stop) and self._next_chunk(final=False) is not None:
                self._compacting = True
                self._compaction = self._coordinator.submit(self._compact_in_background)

    def _compact_in_background(self) -> None:
        """Compaction thread: compact every chunk of rows committed whole, then end (the next commit
        that completes a chunk starts it again: it sees ``_compacting`` false only once this loop
        has seen no chunk left, under the same lock)."""
        try:
            while True:
                with self._compaction_cv:
                    chunk = None if self._compaction_stop else self._next_chunk(final=False)
                    if chunk is None:
                        self._compacting = False
                        self._compaction_cv.notify_all()
                        return
                self._compact_rows(*chunk, self._compactors)
        except BaseException as exc:
            with self._compaction_cv:
                self._compacting = False
                self._compaction_cv.notify_all()
            if self.on_compaction_failure is not None:
                self.on_compaction_failure(exc)
            raise

    def _next_chunk(self, final: bool) -> tuple[CommitRecord, int, int] | None:
        """(record, start, stop) of the next rows to compact: a complete chunk of committed rows;
        with ``final``, a partial last one too (it is rewritten when it grows). None if none."""
        record = self._record
        start = record.compacted_rows - record.compacted_rows % self.chunk_rows
        stop = min(start + self.chunk_rows, record.committed_rows)
        if stop <= record.compacted_rows or (stop - start < self.chunk_rows and not final):
            return None
        return record, start, stop

    def _compact_rows(self, record: CommitRecord, start: int, stop: int, pool) -> None:
        """Compact rows ``[start, stop)`` as ``record`` admits them, each shard a task on ``pool``,
        commit, then drop their hot copies (one task beside the next chunk's: each delete is a
        metadata write, slow on some disks)."""
        reader = self._reader(record)
        self._main = compaction.write_main_rows(
            self._store, self._main, self._meta.arrays(), reader.read_into, start, stop, pool, self.durable
        )
        self._commit(compacted_rows=stop)
        reader.close()
        # The hot copies of rows now compacted are redundant: delete the blocks whose committed
        # rows all lie below ``stop`` (the last block of a final compaction too: a resumed writer
        # reloads its rows from the main tier).
        keys = [key for hot in self._hot.values() for key in compaction.hot_shards_compacted(hot, start, stop)]
        self._deletions = [d for d in self._deletions if not d.done() or d.exception() is not None]
        self._deletions.append(pool.submit(_delete_all, self._store, keys))

    # -- the end ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Compact every committed row (the background compaction finishes its chunk, helped at
        normal priority; the rest on a fresh pool of ``close_threads``), then stop."""
        self.ring = None  # every row is committed: its memory serves compaction instead
        try:
            with ThreadPoolExecutor(self.pools.close_threads(), "wordystore-close") as pool:
                self._stop_compaction(helpers=pool)
                while (chunk := self._next_chunk(final=True)) is not None:
                    self._compact_rows(*chunk, pool)
            if self._compactors is not None:
                self._compactors.help_until(self._deletions)
            _all_results(self._deletions)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Stop: every task done (the pools run what is queued in this thread too), every hot copy
        to delete gone. Blocks not yet written are written first."""
        with self._compaction_cv:
            self._compaction_stop = True
        for pool in (self._writers, self._committer, self._compactors, self._coordinator):
            if pool is not None:
                pool.shutdown()

    def _stop_compaction(self, helpers: ThreadPoolExecutor) -> None:
        """Let the background compaction finish the chunk under way (``helpers`` run its queued
        tasks at their own priority) and stop; raise its failure if any."""
        with self._compaction_cv:
            self._compaction_stop = True
        if self._compaction is None:
            return
        helping = max(1, self.pools.close_threads() - self.pools.compaction_threads)  # as many as close uses, in all
        wait([helpers.submit(self._compactors.help_until, [self._compaction]) for _ in range(helping)])
        self._compaction.result()


def _all_results(futures: list[Future]) -> list:
    """Every future's result once all are done (none is left running on a failure); the first
    failure is raised."""
    wait(futures)
    return [future.result() for future in futures]


def _delete_all(store, keys: list[str]) -> None:
    for key in keys:
        storage.delete(store, key)
