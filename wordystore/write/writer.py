"""The streaming writer: one ``append`` per training step; compression, I/O and compaction in the
background, in flat memory, on pools sized to the machine (:mod:`wordystore.pools`).

Steps are copied into a ring of host buffers (one block of ``block_rows`` steps and a row on a CPU
host, three blocks when a GPU feeds it: page-locked, so copies from the GPU run asynchronously).
Each full block goes to the writer's background (:class:`wordystore.write.committer.Background`, or
the same in a child process: :mod:`wordystore.write.child_process`): its **write threads** store the block's
hot shards in parallel (raw bytes, a checksum and the shard's binding record: no encoding to speak
of), then it rewrites the commit record, so a step becomes visible to readers only once every kind
of it is on disk. Its **compaction threads** run on idle CPU time: as soon as ``chunk_rows`` rows
are committed they encode them into the **main** tier's long chunks, every shard in parallel, move
the commit record's ``compacted_rows`` forward and delete the hot copies; ``close()`` compacts the rest (the
last partial chunk) at normal priority. An append waits only when the machine cannot keep up (a
full ring, or compaction two chunks behind); ``stats()`` counts it and ``close()`` warns. A kill
-9 at any point loses nothing committed: every change of what readers see is one atomic replace
of ``commit.json`` made after the data it admits is on disk (docs/format.md, "Commit protocol").
On object storage every put is fenced by the writer's lease (:mod:`wordystore.store.lease`), and the
pools stay in this process (a child process needs a local store).

A writer is made by :func:`wordystore.write.start.create` or :func:`wordystore.write.start.resume`.
"""

from __future__ import annotations

import collections
import dataclasses
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch

from wordystore.errors import AppendError, BackpressureWarning, WriterFailedError
from wordystore.format.keys import (
    STEPS_ARRAY,
    TOKEN_SETS_GROUP,
    check_config,
    check_kind_name,
    is_token_set,
    vocab_size,
)
from wordystore.format.kinds import numpy_to_torch, scalar_value, torch_to_numpy
from wordystore.format.metadata import Metadata, check_writable
from wordystore.format.records import check_arrays
from wordystore.pools import WriterPools
from wordystore.read import reading
from wordystore.store import json_documents, storage
from wordystore.store.resume_state import ResumeState
from wordystore.store.storage import WriterLock, describe, local_root
from wordystore.write import child_process
from wordystore.write.committer import Background, Ring
from wordystore.write.compaction import TileReader

StateProvider = Callable[[], "tuple[dict[str, torch.Tensor], dict]"]


def check_token_set(name: str, ids, vocab: int | None) -> np.ndarray:
    """Token ids given for a set named ``name``, as the set stores them (sorted, unique int64)."""
    check_kind_name(name)
    ids = np.asarray(torch_to_numpy(ids) if isinstance(ids, torch.Tensor) else ids)
    if ids.dtype == bool:
        raise ValueError(f"token set {name!r}: give token ids, not a boolean mask (use np.flatnonzero(mask))")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token set {name!r}: token ids must be integers, got dtype {ids.dtype}")
    ids = np.unique(ids.astype(np.int64))
    if not is_token_set(ids, vocab):  # sorted and unique already: an id out of range
        raise ValueError(f"token set {name!r}: ids must lie in [0, {vocab}); got {ids[0]}..{ids[-1]}")
    return ids


def write_token_set(store, meta: Metadata, name: str, ids: np.ndarray) -> None:
    layout = meta.token_set_layout(name, ids.size)
    json_documents.write_layout(store, layout)
    for coords in np.ndindex(*layout.shard_grid()):
        storage.put(store, layout.shard_key(coords), layout.encode_shard(coords, ids[layout.shard_region(coords)]))


@dataclass(frozen=True)
class WriterStats:
    """What a writer has done since it was opened, and how long appends waited for it."""

    appended: int  # rows appended
    committed: int  # rows committed (visible to readers)
    compacted: int  # rows compacted into the main tier
    seconds: float  # since the writer was opened
    waited_for_ring: float  # seconds appends waited for a free slot (the hot tier fell behind)
    waited_for_compaction: float  # seconds appends waited for compaction to catch up
    hot_rows: int  # committed rows not yet compacted
    pools: WriterPools

    @property
    def waited(self) -> float:
        return self.waited_for_ring + self.waited_for_compaction

    def rate(self, rows: int) -> float:
        return rows / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "appended": self.appended,
            "committed": self.committed,
            "compacted": self.compacted,
            "seconds": round(self.seconds, 3),
            "appended_per_s": round(self.rate(self.appended), 3),
            "committed_per_s": round(self.rate(self.committed), 3),
            "compacted_per_s": round(self.rate(self.compacted), 3),
            "waited_for_ring": round(self.waited_for_ring, 3),
            "waited_for_compaction": round(self.waited_for_compaction, 3),
            "hot_rows": self.hot_rows,
            "pools": self.pools.to_dict(),
        }

    def describe(self) -> str:
        return (
            f"rows in {self.rate(self.appended):.2f}/s, committed {self.rate(self.committed):.2f}/s, "
            f"compacted {self.rate(self.compacted):.2f}/s; appends waited {self.waited_for_ring:.1f} s "
            f"for the hot tier and {self.waited_for_compaction:.1f} s for compaction, of {self.seconds:.1f} s"
        )


class TrajectoryWriter:
    """Appends steps to one trajectory. Use :func:`wordystore.create` or :func:`wordystore.resume` to get one."""

    def __init__(self, store, lock: WriterLock, durable: bool, keep_states: int = 1, pools: WriterPools | None = None):
        self._store, self._lock = store, lock
        durable = durable and local_root(store) is not None
        self.pools = pools or WriterPools.for_machine()
        self._meta = json_documents.read_metadata(store)
        check_writable(self._meta, describe(store))
        self.kinds = dict(self._meta.kinds)
        self.block_rows, self.chunk_rows = self._meta.block_rows, self._meta.chunk_rows
        record = json_documents.read_commit(store)
        self.last_step = record.last_step
        layouts = json_documents.read_layouts(store, self._meta)
        check_arrays(describe(store), self._meta, record, layouts)
        reading.check_held(store, record, layouts)

        # The ring holds ``ring_blocks`` blocks and a row: appends go on while blocks are written.
        # The rows of a block stay in it until the block is written whole (a flushed partial block
        # is rewritten whole when it completes).
        capacity, pin = self.pools.ring_blocks * self.block_rows + 1, torch.cuda.is_available()
        if self.pools.process and not (
            local_root(store) is not None
            and child_process.shared_memory_room(Ring.nbytes(self._meta.arrays(), capacity))
        ):
            warnings.warn(
                f"the writer of {describe(store)} keeps its pools in this process: a child "
                "process needs a local store (a directory, not object storage) and room in /dev/shm for "
                "its ring",
                RuntimeWarning,
                stacklevel=3,
            )
            self.pools = dataclasses.replace(self.pools, process=False)
        if self.pools.process:
            self._background = child_process.RemoteBackground(
                store, self._meta, record, capacity, durable, keep_states, self.pools, lock, pin, idle=not pin
            )
        else:
            self._background = Background(
                store,
                self._meta,
                record,
                layouts,
                Ring.allocate(self._meta.arrays(), capacity, pin),
                durable,
                keep_states,
                self.pools,
            )
        self._ring: Ring | None = self._background.ring
        self._next_row = record.committed_rows
        self._freed_rows = self._next_row - self._next_row % self.block_rows  # rows below: out of the ring
        self._blocks: collections.deque[tuple[Future, int, int]] = collections.deque()  # (future, first row, rows)
        self._cuda_event = None  # recorded after the latest copy from a GPU into the ring
        self._state_provider: StateProvider | None = None
        self._pending_state: ResumeState | None = None
        self._failure: BaseException | None = None
        self._closed = False
        self._opened = time.monotonic()
        self._opened_rows = (record.committed_rows, record.compacted_rows)
        self._appended = 0
        self._waited_for_ring = self._waited_for_compaction = 0.0
        if self._next_row > self._freed_rows:
            self._reload_partial_block(reading.StoreReader(store, self._meta, record, layouts, threads=1))

    # -- public API ------------------------------------------------------------------------------

    @property
    def committed(self) -> int:
        """Rows visible to readers."""
        return self._background.record.committed_rows

    def append(self, step: int, **tensors) -> None:
        """Buffer one step; readers see it once its block of rows is committed (or on ``flush``).

        Parameters
        ----------
        step : int
            The training step, greater than the last appended one (steps may skip, as with
            ``--record-every``).
        **tensors
            Every declared kind by name, as a torch tensor (any device) or numpy array of the
            kind's shape and dtype; 0-d kinds also take Python and numpy numbers. Values are
            copied into the writer's buffer (from a GPU, asynchronously on the current stream).

        Returns
        -------
        None
            Raises :class:`wordystore.AppendError` (a missing or unknown kind, a shape or dtype
            that is not the kind's, a step not after the last) and appends nothing then. It
            waits only when the writer cannot keep up (backpressure, counted in :meth:`stats`).

        Examples
        --------
        >>> import torch, wordystore
        >>> kinds = {"w": wordystore.Kind((4,), "float32", ("token",)), "loss": wordystore.Kind((), "float32", ())}
        >>> with wordystore.create("runs/w.zarr", kinds) as w:
        ...     w.append(0, w=torch.zeros(4), loss=2.5)
        ...     w.append(10, w=torch.ones(4), loss=1.25)
        >>> wordystore.open("runs/w.zarr").loss.numpy()
        array([2.5 , 1.25], dtype=float32)
        """
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
        values[STEPS_ARRAY] = torch.tensor(step, dtype=torch.int64)

        row = self._next_row
        self._make_room(row)
        self._ring.put(row, values)
        if any(value.is_cuda for value in values.values()):  # the block's writer waits for these copies
            self._cuda_event = torch.cuda.Event()
            self._cuda_event.record()
        self._next_row += 1
        self._appended += 1
        self.last_step = step
        if self._next_row % self.block_rows == 0:
            if self._state_provider is not None:
                self._capture_state()
            self._submit(row + 1 - self.block_rows, self.block_rows)

    def bulk_append(self, steps: np.ndarray, read_tile: TileReader, progress=None) -> None:
        """Append ``len(steps)`` rows straight into the main tier, a chunk of rows at a time, with
        every core encoding (``convert``, ``import`` and ``stitch`` use it): ``read_tile(name, fetch,
        out)`` fills ``out`` with the orthogonal selection ``fetch`` (rows counted from this call's
        first row) of array ``name``. Only on a writer in this process with nothing buffered and
        every row compacted on a chunk boundary, e.g. a fresh store. ``progress(rows)`` is called
        after each chunk."""
        self._check_open()
        record = self._background.record
        if (
            not isinstance(self._background, Background)
            or self._next_row != record.committed_rows
            or record.compacted_rows != record.committed_rows
            or record.committed_rows % self.chunk_rows
        ):
            raise ValueError("bulk_append needs a writer in this process with every row compacted on a chunk boundary")
        steps = np.asarray(steps, dtype=np.int64)
        if steps.size and (
            np.any(np.diff(steps) <= 0) or steps[0] < 0 or (self.last_step is not None and steps[0] <= self.last_step)
        ):
            raise AppendError("bulk_append: steps must be >= 0, increasing, and after the last step appended")
        self._background.bulk_append(steps, read_tile, progress)
        self.last_step = self._background.record.last_step
        self._next_row = self.committed
        self._freed_rows = self._next_row - self._next_row % self.block_rows
        if self._next_row > self._freed_rows:
            self._reload_partial_block(self._background.reader())

    def set_state_provider(self, provider: StateProvider | None) -> None:
        """Keep a resume state with the commits: ``provider()`` returns ``(tensors, info)`` (a dict
        of tensors and a JSON-serialisable dict) describing the run right after the last appended
        step. It is called after each append that closes a block and on ``flush``/``close``, and
        stored atomically with that block's commit (``wordystore.load_state`` reads it back)."""
        self._state_provider = provider

    def flush(self) -> None:
        """Write and commit every buffered step now; returns when they are visible to readers."""
        self._check_open()
        first = self._next_row - self._next_row % self.block_rows
        if self._next_row > max(first, self.committed):  # the block under way, written as far as it goes
            if self._state_provider is not None and self._pending_state is None:
                self._capture_state()
            self._submit(first, self._next_row - first)
        while self._blocks:
            self._wait_oldest_block()

    def keep_state(self, state: ResumeState) -> None:
        """Keep ``state``, the state of the last committed row, with the commits (``convert``
        carries a run's newest state over to the store it writes). Only on a writer in this process."""
        self.flush()
        if not isinstance(self._background, Background):
            raise ValueError("keep_state needs a writer in this process (writer_process=False)")
        if (state.row, state.step) != (self.committed - 1, self.last_step):
            raise ValueError(
                f"a resume state of row {state.row}, step {state.step} is not of the last committed row "
                f"{self.committed - 1}, step {self.last_step}"
            )
        self._background.keep_state(state)

    def add_token_set(self, name: str, ids) -> None:
        """Store a named set of token ids (sorted, unique) with the trajectory."""
        self._check_open()
        ids = check_token_set(name, ids, vocab_size(self.kinds))
        if not self._meta.token_sets:
            json_documents.write_group(self._store, TOKEN_SETS_GROUP)
        write_token_set(self._store, self._meta, name, ids)
        self._set_metadata(token_sets=tuple(sorted({*self._meta.token_sets, name})))

    def update_config(self, **entries) -> None:
        """Add or replace entries of the stored config (e.g. a summary written at the end of a run)."""
        self._check_open()
        config = {**self._meta.config, **entries}
        check_config(config)
        self._set_metadata(config=config)

    @property
    def vocab_size(self) -> int | None:
        """Length of the ``token`` axis shared by the kinds that have one."""
        return vocab_size(self.kinds)

    def stats(self) -> WriterStats:
        """Rows appended, committed and compacted since the writer was opened, and how long appends
        waited for the hot tier or compaction (backpressure: this machine could not keep up)."""
        record = self._background.record
        return WriterStats(
            self._appended,
            record.committed_rows - self._opened_rows[0],
            record.compacted_rows - self._opened_rows[1],
            time.monotonic() - self._opened,
            self._waited_for_ring,
            self._waited_for_compaction,
            record.committed_rows - record.compacted_rows,
            self.pools,
        )

    def close(self) -> None:
        """Commit every buffered step, compact every committed row, stop the background threads
        and release the lock. Warns (:class:`wordystore.BackpressureWarning`) if appends had to wait
        for the writer."""
        if self._closed:
            return
        try:
            if self._failure is None:
                self.flush()
                self._ring = None  # every row is committed: the background frees its memory
                self._background.close()
        except BaseException as exc:
            self._failure = self._failure or exc
        finally:
            self._closed, self._ring = True, None
            try:
                if self._failure is not None:
                    self._background.shutdown()
            finally:
                self._lock.release()
        if self._failure is not None:
            raise WriterFailedError(
                f"writing {describe(self._store)} failed; {self.committed} rows are committed and readable"
            ) from self._failure
        self._report_backpressure()

    def abandon(self) -> None:
        """Give the store up (a whole build that failed): stop the threads, release the lock and
        delete everything written."""
        self._failure = self._failure or RuntimeError("build abandoned")
        try:
            self.close()
        except WriterFailedError:
            pass
        storage.clear_store(self._store)

    def __enter__(self) -> TrajectoryWriter:
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
        return (
            f"<TrajectoryWriter {describe(self._store)}: {self.committed} rows committed "
            f"({self._background.record.compacted_rows} compacted), {self._next_row - self.committed} buffered, "
            f"kinds {list(self.kinds)}>"
        )

    # -- validation ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._failure is not None:
            raise WriterFailedError(
                f"the background writer of {describe(self._store)} failed; {self.committed} rows are committed"
            ) from self._failure
        if self._closed:
            raise ValueError(f"the writer of {describe(self._store)} is closed")
        while self._blocks and self._blocks[0][0].done():
            self._wait_oldest_block()

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

    # -- the ring and the block writes -----------------------------------------------------------

    def _reload_partial_block(self, reader: reading.StoreReader) -> None:
        """On resume mid-block (or after a bulk append that ended mid-block): the block's committed
        rows, read by ``reader``, go back into the ring, so the block is rewritten whole when it
        completes."""
        first, rows = self._freed_rows, self._next_row - self._freed_rows
        for name, slots in self._ring.slots.items():
            shape = (rows, *slots.shape[1:])
            block = reader.read(name, (slice(first, self._next_row, 1), *(slice(0, n, 1) for n in shape[1:])), shape)
            for row, values in enumerate(numpy_to_torch(block), start=first):
                self._ring.put(row, {name: values})
        reader.close()

    def _capture_state(self) -> None:
        tensors, info = self._state_provider()
        copies = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
        self._pending_state = ResumeState(self._next_row - 1, self.last_step, copies, info)

    def _make_room(self, row: int) -> None:
        """Before filling ``row``'s slot: wait (counted as backpressure) until the row that held it
        was written whole, and until compaction is at most two chunks of rows behind."""
        self._background.wait_ready()  # a child process starting: not backpressure
        began = time.monotonic()
        while row - self._ring.capacity >= self._freed_rows:
            self._wait_oldest_block()
        waited = time.monotonic()
        self._waited_for_ring += waited - began
        if self.pools.compaction_threads:
            try:
                self._background.wait_for_compaction(2 * self.chunk_rows)
            except BaseException as exc:
                self._fail(exc)
                self._check_open()
            self._waited_for_compaction += time.monotonic() - waited

    def _wait_oldest_block(self) -> None:
        future, first, n = self._blocks.popleft()
        self._background.help_until(future)
        try:
            future.result()
        except BaseException as exc:
            self._fail(exc)
            raise WriterFailedError(
                f"the background writer of {describe(self._store)} failed; {self.committed} rows are committed"
            ) from exc
        if n == self.block_rows:  # written whole: its slots are free (a flushed partial block stays)
            self._freed_rows = first + n

    def _fail(self, exc: BaseException) -> None:
        """A background write failed: write nothing more, let the background stop, and release the
        lock, so that once the cause is fixed ``wordystore.resume`` goes on (in this process too).
        Every committed row stays as it is."""
        if self._failure is not None:
            return
        self._failure = exc
        try:
            self._background.shutdown()
        finally:
            self._lock.release()

    def _submit(self, first: int, n: int) -> None:
        """Hand rows ``[first, first + n)`` (a block, or the first rows of one on flush) to the background."""
        state = self._pending_state
        if state is not None and state.row == first + n - 1:
            self._pending_state = None
        else:
            state = None
        event, self._cuda_event = self._cuda_event, None
        self._blocks.append((self._background.write_block(first, n, state, event), first, n))

    def _set_metadata(self, **changes) -> None:
        self._meta = dataclasses.replace(self._meta, **changes)
        json_documents.write_metadata(self._store, self._meta, durable=self._background.durable)

    def _report_backpressure(self) -> None:
        """Warn once, at close, if appends waited noticeably for the writer."""
        stats = self.stats()
        if stats.waited > max(BACKPRESSURE_REPORT_SECONDS, BACKPRESSURE_REPORT_SHARE * stats.seconds):
            warnings.warn(
                f"the writer of {describe(self._store)} could not keep up with appends: "
                f"{stats.describe()} (writer.stats(); docs/architecture.md, 'Pools')",
                BackpressureWarning,
                stacklevel=3,
            )


BACKPRESSURE_REPORT_SECONDS = 1.0  # waits below this are noise, whatever the run's length
BACKPRESSURE_REPORT_SHARE = 0.05  # a wait above 5% of the writer's life is reported: below, a normal run's cost
