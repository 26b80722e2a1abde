"""The streaming writer: one ``append`` per training step; compression, I/O and compaction in the
background, in flat memory.

Steps are copied into a small ring of host buffers (``block_rows + 1`` steps of every kind: about
230 MB for the seed config, whatever the step count). Each full block goes to a background thread
that writes it to the **hot** tier with a fast codec and then rewrites the commit record, so a step
becomes visible to readers only once every kind of it is on disk. A second, low-priority thread
**compacts** every ``chunk_rows`` committed rows into the **main** tier's long, well-compressed
chunks, reading them back from the hot tier one shard at a time, then moves the commit record's
``compacted_rows`` forward and deletes the hot copies. ``close()`` compacts the rest. A kill -9 at
any point loses nothing committed: every change of what readers see is one atomic replace of
``commit.json`` made after the data it admits is on disk (docs/format.md, "Commit protocol").

Shards are encoded by :mod:`wordystore.compaction`; a writer is made by
:func:`wordystore.lifecycle.create` or :func:`wordystore.lifecycle.resume`.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

from wordystore import compaction, documents, format, reading, storage
from wordystore.compaction import TileReader
from wordystore.errors import AppendError, WriterFailedError
from wordystore.kinds import numpy_to_torch, scalar_value, torch_to_numpy
from wordystore.resume_state import ResumeState
from wordystore.storage import WriterLock, describe, local_root

StateProvider = Callable[[], "tuple[dict[str, torch.Tensor], dict]"]


def check_token_set(name: str, ids, vocab: int | None) -> np.ndarray:
    """Token ids given for a set named ``name``, as the set stores them (sorted, unique int64)."""
    format.check_kind_name(name)
    ids = np.asarray(torch_to_numpy(ids) if isinstance(ids, torch.Tensor) else ids)
    if ids.dtype == bool:
        raise ValueError(f"token set {name!r}: give token ids, not a boolean mask (use np.flatnonzero(mask))")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token set {name!r}: token ids must be integers, got dtype {ids.dtype}")
    ids = np.unique(ids.astype(np.int64))
    if not format.is_token_set(ids, vocab):  # sorted and unique already: an id out of range
        raise ValueError(f"token set {name!r}: ids must lie in [0, {vocab}); got {ids[0]}..{ids[-1]}")
    return ids


def write_token_set(store, meta: format.Metadata, name: str, ids: np.ndarray) -> None:
    layout = meta.token_set_layout(name, ids.size)
    documents.write_layout(store, layout)
    for coords in np.ndindex(*layout.shard_grid()):
        storage.put(store, layout.shard_key(coords), layout.encode_shard(coords, ids[layout.shard_region(coords)]))


class TrajectoryWriter:
    """Appends steps to one trajectory. Use :func:`wordystore.create` or :func:`wordystore.resume` to get one."""

    def __init__(self, store, lock: WriterLock, durable: bool, keep_states: int = 1):
        self._store, self._lock = store, lock
        self._durable = durable and local_root(store) is not None
        self._keep_states = keep_states
        self._meta = documents.read_metadata(store)
        format.check_writable(self._meta, describe(store))
        self.kinds = dict(self._meta.kinds)
        self.block_rows, self.chunk_rows = self._meta.block_rows, self._meta.chunk_rows
        self._record = documents.read_commit(store)
        self._record_lock = threading.Lock()
        self.last_step = self._record.last_step
        layouts = documents.read_layouts(store, self._meta)
        format.check_arrays(describe(store), self._meta, self._record, layouts)
        reading.check_held(store, self._record, layouts)
        self._main = {name: main for name, (main, _) in layouts.items()}
        self._hot = {name: hot for name, (_, hot) in layouts.items()}

        # Ring of host buffers: slot i holds row ``self._first_row + i``; the first rows of a block
        # stay in the ring until the block is complete (a flushed partial block is rewritten whole).
        capacity = self.block_rows + 1
        pin = torch.cuda.is_available()
        self._slots = {name: torch.empty((capacity, *kind.shape), dtype=kind.torch_dtype, pin_memory=pin)
                       for name, kind in self._meta.arrays().items()}
        self._first_row = self._record.committed_rows - self._record.committed_rows % self.block_rows
        self._filled = 0
        self._cuda_event = None  # recorded after the latest copy from a GPU into the ring
        self._state_provider: StateProvider | None = None
        self._pending_state: ResumeState | None = None
        self._in_flight: tuple[Future, int] | None = None  # (future, rows it writes)
        # Both threads yield to training. Writing a block takes a few percent of a core, so at nice
        # 10 (a tenth of a core under contention) it keeps up; compaction waits for idle time.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wordystore-writer",
                                        initializer=_lower_priority, initargs=(10,))
        self._compactor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wordystore-compact",
                                             initializer=_lower_priority, initargs=(19,))
        self._compaction: Future | None = None
        self._failure: BaseException | None = None
        self._closed = False
        self._reload_partial_block()

    # -- public API ------------------------------------------------------------------------------

    @property
    def committed(self) -> int:
        """Rows visible to readers."""
        return self._record.committed_rows

    def append(self, step: int, **tensors) -> None:
        """Buffer one step: every declared kind, as a torch tensor (any device) or numpy array of
        the kind's shape and dtype; 0-d kinds also take Python and numpy numbers."""
        self._check_open()
        step = self._check_step(step)
        missing = sorted(set(self.kinds) - set(tensors))
        unknown = sorted(set(tensors) - set(self.kinds))
        if unknown or missing:
            raise AppendError(
                f"append(step={step}): "
                + (f"unknown kind(s) {unknown}; " if unknown else "")
                + (f"missing kind(s) {missing}; " if missing else "")
                + f"this trajectory records exactly {sorted(self.kinds)}"
            )
        values = {name: self._checked_value(step, name, value) for name, value in tensors.items()}
        values[format.STEPS_ARRAY] = torch.tensor(step, dtype=torch.int64)

        self._make_room()
        slot = self._filled
        for name, value in values.items():
            self._slots[name][slot].copy_(value, non_blocking=True)
            if value.is_cuda:  # any host-side read of the ring waits for this copy first
                self._cuda_event = torch.cuda.Event()
                self._cuda_event.record()
        self._filled += 1
        self.last_step = step
        if self._state_provider is not None and (self._first_row + self._filled) % self.block_rows == 0:
            self._capture_state()
        if self._in_flight is None and self._filled >= self.block_rows:
            self._submit(self.block_rows)

    def bulk_append(self, steps: np.ndarray, read_tile: TileReader, progress=None) -> None:
        """Append ``len(steps)`` rows straight into the main tier, a chunk of rows at a time, with
        every core encoding (``convert``, ``import`` and ``stitch`` use it): ``read_tile(name, fetch,
        out)`` fills ``out`` with the orthogonal selection ``fetch`` (rows counted from this call's
        first row) of array ``name``. Only on a writer with nothing buffered and every row compacted
        on a chunk boundary, e.g. a fresh store. ``progress(rows)`` is called after each chunk."""
        self._check_open()
        record = self._record
        if self._filled or record.compacted_rows != record.committed_rows or record.committed_rows % self.chunk_rows:
            raise ValueError("bulk_append needs a writer with every row compacted on a chunk boundary")
        steps = np.asarray(steps, dtype=np.int64)
        if steps.size and (np.any(np.diff(steps) <= 0) or steps[0] < 0
                           or (self.last_step is not None and steps[0] <= self.last_step)):
            raise AppendError("bulk_append: steps must be >= 0, increasing, and after the last step appended")
        first = record.committed_rows

        def shifted(name: str, fetch: tuple, out: np.ndarray) -> None:
            rows = slice(fetch[0].start - first, fetch[0].stop - first, 1)
            if name == format.STEPS_ARRAY:
                out[...] = steps[rows]
            else:
                read_tile(name, (rows, *fetch[1:]), out)

        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            for start in range(first, first + len(steps), self.chunk_rows):
                stop = min(start + self.chunk_rows, first + len(steps))
                self._main = compaction.write_main_rows(self._store, self._main, self._meta.arrays(), shifted, start,
                                                        stop, pool, self._durable)
                self._commit(committed_rows=stop, compacted_rows=stop, last_step=int(steps[stop - first - 1]))
                if progress is not None:
                    progress(stop - start)
        self.last_step = self._record.last_step
        self._first_row = self.committed - self.committed % self.block_rows
        self._reload_partial_block()

    def set_state_provider(self, provider: StateProvider | None) -> None:
        """Keep a resume state with the commits: ``provider()`` returns ``(tensors, info)`` (a dict
        of tensors and a JSON-serialisable dict) describing the run right after the last appended
        step. It is called after each append that closes a block and on ``flush``/``close``, and
        stored atomically with that block's commit (``wordystore.load_state`` reads it back)."""
        self._state_provider = provider

    def flush(self) -> None:
        """Write and commit every buffered step now; returns when they are visible to readers."""
        self._check_open()
        self._wait_in_flight()
        while self._first_row + self._filled > self.committed:
            if self._state_provider is not None and self._pending_state is None:
                self._capture_state()
            self._submit(min(self._filled, self.block_rows))
            self._wait_in_flight()

    def keep_state(self, state: ResumeState) -> None:
        """Keep ``state``, the state of the last committed row, with the commits (``convert``
        carries a run's newest state over to the store it writes)."""
        self.flush()
        if (state.row, state.step) != (self.committed - 1, self.last_step):
            raise ValueError(f"a resume state of row {state.row}, step {state.step} is not of the last committed row "
                             f"{self.committed - 1}, step {self.last_step}")
        data = state.encode()
        storage.put(self._store, state.key, data)
        if self._durable:
            storage.sync_to_disk(self._store, [state.key])
        self._commit_with_state(state.entry(data))

    def add_token_set(self, name: str, ids) -> None:
        """Store a named set of token ids (sorted, unique) with the trajectory."""
        self._check_open()
        ids = check_token_set(name, ids, format.vocab_size(self.kinds))
        if not self._meta.token_sets:
            documents.write_group(self._store, format.TOKEN_SETS_GROUP)
        write_token_set(self._store, self._meta, name, ids)
        self._set_metadata(token_sets=tuple(sorted({*self._meta.token_sets, name})))

    def update_config(self, **entries) -> None:
        """Add or replace entries of the stored config (e.g. a summary written at the end of a run)."""
        self._check_open()
        config = {**self._meta.config, **entries}
        format.check_config(config)
        self._set_metadata(config=config)

    @property
    def vocab_size(self) -> int | None:
        """Length of the ``token`` axis shared by the kinds that have one."""
        return format.vocab_size(self.kinds)

    def close(self) -> None:
        """Commit every buffered step, compact every committed row, stop the background threads
        and release the lock."""
        if self._closed:
            return
        try:
            if self._failure is None:
                self.flush()
                self._wait_compaction()
                self._slots.clear()  # every row is committed: the ring's memory serves compaction instead
                self._compact(final=True)
        except BaseException as exc:
            self._failure = self._failure or exc
        finally:
            self._closed = True
            self._pool.shutdown(wait=True)
            self._compactor.shutdown(wait=True)
            self._lock.release()
        if self._failure is not None:
            raise WriterFailedError(
                f"writing {describe(self._store)} failed; {self.committed} rows are committed and readable"
            ) from self._failure

    def abandon(self) -> None:
        """Give the store up (a whole build that failed): stop the threads, release the lock and
        delete everything written."""
        self._failure = self._failure or RuntimeError("build abandoned")
        try:
            self.close()
        except WriterFailedError:
            pass
        storage.clear_store(self._store)

    def __enter__(self) -> "TrajectoryWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # keep the caller's exception; commit what can be committed
            try:
                self.close()
            except WriterFailedError:
                pass

    def __repr__(self) -> str:
        return (f"<TrajectoryWriter {describe(self._store)}: {self.committed} rows committed "
                f"({self._record.compacted_rows} compacted), {self._filled} buffered, kinds {list(self.kinds)}>")

    # -- validation ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._failure is not None:
            raise WriterFailedError(
                f"the background writer of {describe(self._store)} failed; {self.committed} rows are committed"
            ) from self._failure
        if self._closed:
            raise ValueError(f"the writer of {describe(self._store)} is closed")
        self._collect_finished()

    def _check_step(self, step) -> int:
        if isinstance(step, torch.Tensor) and step.numel() == 1:
            step = step.item()
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise AppendError(f"append: step must be an int, got {type(step).__name__} {step!r}")
        step = int(step)
        if self.last_step is not None and step <= self.last_step:
            raise AppendError(f"append(step={step}): steps must increase; the last step appended is {self.last_step}")
        if not 0 <= step < 2**63:
            raise AppendError(f"append(step={step}): steps must lie in [0, 2**63) (stored as int64)")
        return step

    def _checked_value(self, step: int, name: str, value) -> torch.Tensor:
        """``value`` as a tensor of the kind's shape and dtype, or a clear AppendError."""
        kind = self.kinds[name]
        if kind.shape == () and isinstance(value, (int, float, np.generic)):
            try:
                return numpy_to_torch(scalar_value(kind, value))
            except ValueError as exc:
                raise AppendError(f"append(step={step}): kind {name!r}: {exc}") from None
        if isinstance(value, torch.Tensor):
            shape, dtype, want = tuple(value.shape), value.dtype, kind.torch_dtype
        elif isinstance(value, np.ndarray):
            shape, dtype, want = value.shape, value.dtype, kind.numpy_dtype
        else:
            raise AppendError(
                f"append(step={step}): kind {name!r} takes a torch tensor or numpy array, got {type(value).__name__}"
            )
        if shape != kind.shape or dtype != want:
            raise AppendError(
                f"append(step={step}): kind {name!r} expects shape {kind.shape} and dtype {kind.dtype}; "
                f"got shape {shape} and dtype {dtype}"
            )
        return value.detach() if isinstance(value, torch.Tensor) else numpy_to_torch(value)

    # -- the ring buffer and the block thread ----------------------------------------------------

    def _reload_partial_block(self) -> None:
        """On resume mid-block: the block's committed rows go back into the ring, so the block is
        rewritten whole when it completes."""
        rows = self.committed - self._first_row
        if rows == 0:
            return
        reader = self._reader(self._record)
        for name, slots in self._slots.items():
            shape = (rows, *slots.shape[1:])
            block = reader.read(name, (slice(self._first_row, self.committed, 1), *(slice(0, n, 1) for n in shape[1:])),
                                shape)
            slots[:rows] = numpy_to_torch(block)
        reader.close()
        self._filled = rows

    def _wait_for_gpu_copies(self) -> None:
        """Wait for copies from a GPU into the ring: every host-side read of the ring calls this first."""
        if self._cuda_event is not None:
            self._cuda_event.synchronize()
            self._cuda_event = None

    def _capture_state(self) -> None:
        tensors, info = self._state_provider()
        copies = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
        self._pending_state = ResumeState(self._first_row + self._filled - 1, self.last_step, copies, info)

    def _make_room(self) -> None:
        """Before filling a slot: if the ring is full, wait for the block in flight and reclaim its slots."""
        if self._filled == len(next(iter(self._slots.values()))):
            self._wait_in_flight()

    def _collect_finished(self) -> None:
        if self._in_flight is not None and self._in_flight[0].done():
            self._wait_in_flight()
        compaction = self._compaction
        if compaction is not None and compaction.done() and compaction.exception() is not None:
            self._fail(compaction.exception())
            raise WriterFailedError(
                f"the background compaction of {describe(self._store)} failed; {self.committed} rows are committed"
            ) from compaction.exception()

    def _wait_in_flight(self) -> None:
        if self._in_flight is None:
            return
        future, n = self._in_flight
        self._in_flight = None
        try:
            future.result()
        except BaseException as exc:
            self._fail(exc)
            raise WriterFailedError(
                f"the background writer of {describe(self._store)} failed; {self.committed} rows are committed"
            ) from exc
        if n < self.block_rows:  # a flushed partial block stays in the ring
            return
        rest = self._filled - n
        self._wait_for_gpu_copies()
        for buffer in self._slots.values():
            buffer[:rest] = buffer[n : self._filled].clone()
        self._first_row += n
        self._filled = rest
        if self._filled >= self.block_rows:
            self._submit(self.block_rows)

    def _fail(self, exc: BaseException) -> None:
        """A background write failed: write nothing more, let the other thread finish, and release
        the lock, so that once the cause is fixed ``wordystore.resume`` goes on (in this process
        too). Every committed row stays as it is."""
        self._failure = exc
        self._pool.shutdown(wait=True)
        self._compactor.shutdown(wait=True)
        self._lock.release()

    def _submit(self, n: int) -> None:
        self._wait_for_gpu_copies()
        block = {name: torch_to_numpy(buffer[:n]) for name, buffer in self._slots.items()}
        state = self._pending_state
        if state is not None and state.row == self._first_row + n - 1:
            self._pending_state = None
        else:
            state = None
        self._in_flight = (self._pool.submit(self._write_block, self._first_row, block, state), n)

    def _write_block(self, first_row: int, block: dict[str, np.ndarray], state: ResumeState | None) -> None:
        """Block thread: write rows ``first_row ...`` of every array to the hot tier, then commit them."""
        end = first_row + len(block[format.STEPS_ARRAY])
        keys = []
        for name, data in block.items():
            layout = self._hot[name].with_rows(max(end, self._hot[name].shape[0]))
            for coords in compaction.block_shards(layout, first_row):
                key = layout.shard_key(coords)
                storage.put(self._store, key, compaction.encode_hot_shard(layout, coords, data))
                keys.append(key)
            self._hot[name] = layout
            documents.write_layout(self._store, layout)
            keys.append(format.document_key(layout.path))
        entry = None
        if state is not None:
            data = state.encode()
            storage.put(self._store, state.key, data)
            keys.append(state.key)
            entry = state.entry(data)
        if self._durable:
            storage.sync_to_disk(self._store, keys)
        self._commit_with_state(entry, committed_rows=end, last_step=int(block[format.STEPS_ARRAY][-1]))
        previous = self._compaction  # a failed compaction is not retried: the main thread reports it
        if self.committed - self._record.compacted_rows >= self.chunk_rows and (
                previous is None or (previous.done() and previous.exception() is None)):
            self._compaction = self._compactor.submit(self._compact)

    def _commit(self, **changes) -> None:
        """Replace the commit record (both background threads go through here, one at a time)."""
        with self._record_lock:
            self._record = dataclasses.replace(self._record, **changes)
            documents.write_commit(self._store, self._record, durable=self._durable)

    def _commit_with_state(self, entry: dict | None, **changes) -> None:
        """Commit ``changes`` with the state ``entry`` names (None: none) kept too; the states past
        ``keep_states`` are dropped from the record, then their files deleted."""
        states = self._record.states + ((entry,) if entry else ())
        self._commit(states=states[-self._keep_states:], **changes)
        for old in states[: -self._keep_states]:
            storage.delete(self._store, old["key"])

    def _set_metadata(self, **changes) -> None:
        self._meta = dataclasses.replace(self._meta, **changes)
        documents.write_metadata(self._store, self._meta, durable=self._durable)

    def _reader(self, record: format.CommitRecord) -> reading.StoreReader:
        """A reader of the rows ``record`` admits, in this writer's layouts (one thread, no cache)."""
        layouts = {name: (self._main[name], self._hot[name]) for name in self._main}
        return reading.StoreReader(self._store, self._meta, record, layouts, threads=1)

    # -- compaction ------------------------------------------------------------------------------

    def _wait_compaction(self) -> None:
        if self._compaction is not None:
            self._compaction.result()

    def _compact(self, final: bool = False) -> None:
        """Move committed rows from the hot tier into the main tier's long chunks: every complete
        chunk of rows; with ``final``, the last partial one too (it is rewritten when it grows)."""
        threads = (os.cpu_count() or 1) if final else 1
        with ThreadPoolExecutor(threads) as pool:
            while True:
                record = self._record
                start = record.compacted_rows - record.compacted_rows % self.chunk_rows
                stop = min(start + self.chunk_rows, record.committed_rows)
                if stop <= record.compacted_rows or (stop - start < self.chunk_rows and not final):
                    return
                self._compact_rows(record, start, stop, pool)

    def _compact_rows(self, record: format.CommitRecord, start: int, stop: int, pool) -> None:
        """Compact rows ``[start, stop)`` as ``record`` admits them, commit, then drop their hot copies."""
        reader = self._reader(record)
        self._main = compaction.write_main_rows(self._store, self._main, self._meta.arrays(), reader.read_into,
                                                start, stop, pool, self._durable)
        self._commit(compacted_rows=stop)
        reader.close()
        # The hot copies of rows now compacted are redundant: delete the blocks whose committed
        # rows all lie below ``stop`` (the last block of a final compaction too: a resumed writer
        # reloads its rows from the main tier).
        for hot in self._hot.values():
            for key in compaction.hot_shards_compacted(hot, start, stop):
                storage.delete(self._store, key)


def _lower_priority(niceness: int) -> None:
    """Lower the calling thread's CPU priority (Linux sets it per thread; elsewhere nothing)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):
        pass
