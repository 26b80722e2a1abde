"""The read path of a trajectory: which tier holds each row, a plan of chunk reads computed without
I/O, then a parallel decode straight into the output.

:class:`StoreReader` is a trajectory's arrays as one commit record admits them, and every read of
a trajectory goes through it: it takes each row from the tier the record puts it in
(:class:`wordystore.format.RowTiers`) and catches up with a running writer's compaction (below).
:func:`plan_reads` turns an orthogonal selection (per axis a slice or sorted unique positions, as
:func:`wordystore.indexing.plan` produces) into one :class:`ChunkRead` per inner chunk it touches:
which chunk, which part of it, and where that part goes in the output. :class:`ChunkReader` then
fetches each shard's bytes (the whole shard, or its index and the needed chunks), decodes every
chunk on a pool of threads (the codecs release the GIL) and copies the selected part into the
output, gathering the token selection as it goes. Decoded chunks go through a bounded LRU cache,
so iterating over steps or re-running a cell decodes nothing twice.

A reader holding an older commit record may find a hot shard deleted by a later compaction
(docs/format.md, "Commit protocol"): it re-reads the record, takes the rows compacted since from
the main tier (their values are the same) and reads again. Its row count stays until ``refresh()``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from wordystore import documents, storage
from wordystore.codecs import ShardIndex
from wordystore.errors import CorruptChunkError, FormatError
from wordystore.format import STEPS_ARRAY, TIERS, ArrayLayout, CommitRecord, Metadata, array_path, check_arrays

DEFAULT_CACHE_BYTES = int(os.environ.get("WORDYSTORE_CACHE_BYTES", 2 << 30))
THREADS = os.cpu_count() or 1
REBUILD_CHUNKS = 4  # a predicted moment's chunks rebuilt at once (ChunkReader._decoded)


class StoreReader:
    """A trajectory's arrays as one commit record admits them: the metadata, the record, each array's
    (main, hot) layouts, and the reads. A :class:`wordystore.Trajectory` is a face over one; the
    writer reads the rows it compacts or reloads through one too."""

    def __init__(self, store, meta: Metadata, record: CommitRecord,
                 layouts: dict[str, tuple[ArrayLayout, ArrayLayout]], cache: ChunkCache | None = None,
                 threads: int | None = None):
        self.store, self.meta = store, meta
        self._chunks = ChunkReader(store, cache, threads)
        self._adopt(record, layouts)

    @classmethod
    def open(cls, store, cache_bytes: int = DEFAULT_CACHE_BYTES, threads: int | None = None) -> "StoreReader":
        """The trajectory in ``store`` as its commit record stands now (see :meth:`refresh`), read
        on ``threads`` threads (default: every core)."""
        reader = cls(store, documents.read_metadata(store), CommitRecord(), {}, ChunkCache(cache_bytes), threads)
        reader.refresh()
        return reader

    def refresh(self) -> None:
        """Re-read the commit record and the arrays' layouts, checked against the metadata."""
        record = documents.read_commit(self.store)
        layouts = documents.read_layouts(self.store, self.meta)
        check_arrays(storage.describe(self.store), self.meta, record, layouts)
        self._adopt(record, layouts)

    def _adopt(self, record: CommitRecord, layouts: dict[str, tuple[ArrayLayout, ArrayLayout]]) -> None:
        self.record, self.layouts = record, layouts
        self._chunks.main_layouts = {name: main for name, (main, _) in layouts.items()}

    def read_steps(self) -> np.ndarray:
        """The training step of every committed row, strictly increasing (else FormatError)."""
        rows = self.record.committed_rows
        steps = self.read(STEPS_ARRAY, (slice(0, rows, 1),), (rows,))
        if np.any(np.diff(steps) <= 0):
            where = storage.describe(self.store)
            raise FormatError(f"{where}: recorded_steps are not increasing; the store is damaged "
                              f"(run `wordystore verify {where}`)")
        return steps

    def tiers(self, name: str) -> list[Tier]:
        """Where each committed row of array ``name`` is read from."""
        rows = self.record.tiers
        return [Tier(layout, *rows.span(tier)) for layout, tier in zip(self.layouts[name], TIERS)]

    def read(self, name: str, fetch: tuple, shape: tuple[int, ...]) -> np.ndarray:
        """The orthogonal selection ``fetch`` of array ``name`` (of ``shape``), decoded into a new array."""
        out = np.empty(shape, self.meta.arrays()[name].numpy_dtype)
        self.read_into(name, fetch, out)
        return out

    def read_into(self, name: str, fetch: tuple, out: np.ndarray) -> None:
        """Fill ``out`` with the orthogonal selection ``fetch`` (per axis a slice with step >= 1 or
        sorted unique positions) of array ``name``."""
        if not out.size:
            return
        try:
            self._chunks.execute(plan_reads(self.tiers(name), fetch), out)
        except CorruptChunkError:
            if not self.catch_up_compaction():
                raise
            self._chunks.execute(plan_reads(self.tiers(name), fetch), out)

    def catch_up_compaction(self) -> bool:
        """A running writer compacted rows since our commit record and deleted their hot copies:
        read those rows from the main tier now (the row count stays until :meth:`refresh`).
        False if nothing was compacted since, so that a read's failure is damage."""
        record = documents.read_commit(self.store)
        if record.compacted_rows <= self.record.compacted_rows:
            return False
        compacted = min(record.compacted_rows, self.record.committed_rows)
        self._adopt(dataclasses.replace(self.record, compacted_rows=compacted),
                    {name: (documents.read_layout(self.store, array_path(name)), hot)
                     for name, (_, hot) in self.layouts.items()})
        return True

    def read_token_set(self, name: str) -> np.ndarray:
        return self._chunks.read_whole(documents.read_token_set_layout(self.store, name))

    def uncached(self) -> "StoreReader":
        """The same rows, read without a chunk cache (a reader of its own)."""
        return StoreReader(self.store, self.meta, self.record, self.layouts, ChunkCache(0))

    def close(self) -> None:
        """Stop the read threads and drop the chunk cache."""
        self._chunks.close()
        self._chunks.cache.clear()


@dataclass(frozen=True)
class Tier:
    """Rows ``[start, stop)`` of a trajectory array are read from ``layout``."""

    layout: ArrayLayout
    start: int
    stop: int


@dataclass(frozen=True)
class ChunkRead:
    layout: ArrayLayout
    coords: tuple[int, ...]  # the inner chunk's coordinates in the array's chunk grid
    local: tuple  # per axis: slice or int array into the chunk (array axis order)
    out: tuple  # per axis: slice into the output block
    valid_rows: int  # rows of the chunk that hold committed data (part of the cache key)

    @property
    def shard(self) -> tuple[int, ...]:
        return tuple(c // n for c, n in zip(self.coords, self.layout.chunks_per_shard))

    @property
    def key(self) -> tuple:
        """The decoded chunk's key in the cache."""
        return self.layout.path, self.coords, self.valid_rows

    @property
    def inner_index(self) -> int:
        cps = self.layout.chunks_per_shard
        return int(np.ravel_multi_index(tuple(c % n for c, n in zip(self.coords, cps)), cps))

    def describe(self) -> str:
        """Which rows and positions this chunk holds, for error messages."""
        spans = [f"{d} {c * n}..{c * n + n - 1}" for d, c, n in zip(self.layout.dims, self.coords, self.layout.chunk)]
        return f"array '{self.layout.path}' chunk {self.coords} ({', '.join(spans)})"


def _axis_pieces(selection, chunk: int, lo: int, hi: int):
    """(chunk index, local selection, output slice) for each chunk along one axis that holds a
    selected position in ``[lo, hi)``. ``selection`` is a slice with step >= 1 or sorted unique ints."""
    if isinstance(selection, slice):
        start, step = selection.start, selection.step or 1
        n = len(range(start, selection.stop, step))
        first = max(0, math.ceil((lo - start) / step))
        last = min(n, math.ceil((hi - start) / step))  # exclusive
        if first >= last:
            return
        for c in range((start + first * step) // chunk, (start + (last - 1) * step) // chunk + 1):
            k0 = max(first, math.ceil((c * chunk - start) / step))
            k1 = min(last, math.ceil(((c + 1) * chunk - start) / step))
            if k0 < k1:
                a = start + k0 * step - c * chunk
                yield c, slice(a, a + (k1 - k0 - 1) * step + 1, step), slice(k0, k1)
        return
    i_lo, i_hi = np.searchsorted(selection, [lo, hi])
    positions = selection[i_lo:i_hi]
    if positions.size == 0:
        return
    chunk_ids = positions // chunk
    bounds = np.flatnonzero(np.diff(chunk_ids)) + 1
    for a, b in zip(np.r_[0, bounds], np.r_[bounds, positions.size]):
        c = int(chunk_ids[a])
        local = positions[a:b] - c * chunk
        if local[-1] - local[0] == b - a - 1:  # a contiguous run: a slice copies faster
            local = slice(int(local[0]), int(local[-1]) + 1)
        yield c, local, slice(int(i_lo + a), int(i_lo + b))


def plan_reads(tiers: list[Tier], fetch: tuple) -> list[ChunkRead]:
    """Every inner-chunk read that the orthogonal selection ``fetch`` needs."""
    reads = []
    for tier in tiers:
        layout = tier.layout
        per_axis = [list(_axis_pieces(fetch[0], layout.chunk[0], tier.start, tier.stop))]
        for sel, size, n in zip(fetch[1:], layout.chunk[1:], layout.shape[1:]):
            per_axis.append(list(_axis_pieces(sel, size, 0, n)))
        for pieces in itertools.product(*per_axis):
            coords = tuple(p[0] for p in pieces)
            row0 = coords[0] * layout.chunk[0]
            valid = min(tier.stop, row0 + layout.chunk[0]) - row0
            reads.append(ChunkRead(layout, coords, tuple(p[1] for p in pieces), tuple(p[2] for p in pieces), valid))
    return reads


class ChunkCache:
    """A bounded LRU of decoded chunks (in stored order), keyed by array, chunk and valid rows.

    A decoding thread takes a buffer from :meth:`buffer`; if :meth:`put` declines it (a cache too
    small, or disabled with ``max_bytes=0``) the thread hands it back with :meth:`release` once
    done, and the next decode reuses that warm memory. Evicted entries are dropped, never reused,
    since another thread may still be reading one it got from :meth:`get`.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._free: dict[tuple, list[np.ndarray]] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: tuple) -> np.ndarray | None:
        with self._lock:
            array = self._entries.get(key)
            if array is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return array

    def buffer(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A buffer to decode into: a released one of this shape if any."""
        with self._lock:
            free = self._free.get((shape, dtype.str))
            if free:
                return free.pop()
        return np.empty(shape, dtype)

    def put(self, key: tuple, array: np.ndarray) -> bool:
        """Keep ``array`` under ``key``; False if declined (then the caller may :meth:`release` it)."""
        with self._lock:
            if key in self._entries or array.nbytes > self.max_bytes:
                return False
            self._entries[key] = array
            self._bytes += array.nbytes
            while self._bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.nbytes
            return True

    def release(self, array: np.ndarray) -> None:
        """Hand back a buffer nobody else holds, for reuse."""
        with self._lock:
            free = self._free.setdefault((array.shape, array.dtype.str), [])
            if len(free) < 2 * THREADS:  # enough for every decoding thread, no hoard
                free.append(array)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._free.clear()
            self._bytes = 0


class ChunkReader:
    """Executes a read plan on a store: fetch, decode in parallel, copy into the output."""

    def __init__(self, store, cache: ChunkCache | None = None, threads: int | None = None):
        self.store = store
        self.cache = cache if cache is not None else ChunkCache(0)
        self.main_layouts: dict[str, ArrayLayout] = {}  # name -> main-tier layout: what predicted arrays rebuild from
        self.threads = threads or THREADS
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="wordystore-read")

    def read_whole(self, layout: ArrayLayout) -> np.ndarray:
        """Every element of a one-axis array of one tier (a token set)."""
        out = np.empty(layout.shape, layout.numpy_dtype)
        self.execute(plan_reads([Tier(layout, 0, layout.shape[0])], (slice(0, layout.shape[0], 1),)), out)
        return out

    def execute(self, reads: list[ChunkRead], out: np.ndarray) -> None:
        """Fill ``out`` (the bits of the selection) from ``reads``; raises CorruptChunkError naming
        the chunk when one is missing or fails its checksum."""
        by_shard: dict[tuple, list[ChunkRead]] = {}
        for read in reads:
            by_shard.setdefault((read.layout.path, read.shard), []).append(read)
        groups = list(by_shard.values())
        if len(groups) == 1 or self.threads == 1:
            for group in groups:
                self._read_shard(group, out)
            return
        for future in [self._pool.submit(self._read_shard, group, out) for group in groups]:
            future.result()

    def _read_shard(self, reads: list[ChunkRead], out: np.ndarray) -> None:
        pending = []
        for read in reads:
            cached = self.cache.get(read.key)
            if cached is None:
                pending.append(read)
            else:
                _copy(read, cached, out)
        if not pending:
            return
        for read, stored in zip(pending, self._decoded(pending, self._fetch(pending))):
            _copy(read, stored, out)
            if not self.cache.put(read.key, stored):
                self.cache.release(stored)

    def _decoded(self, reads: list[ChunkRead], data: list) -> list[np.ndarray]:
        """The values of some chunks of one shard, in stored order; a predicted moment's rebuilt
        from their residuals ``REBUILD_CHUNKS`` at a time (one replay of the rows for several
        chunks, not one per chunk: the replay's numpy calls take the GIL between them, and many
        small calls do not scale; a few chunks at a time keep its memory to a few MB)."""
        if not reads or reads[0].layout.prediction is None:
            return [self._decode(read, chunk) for read, chunk in zip(reads, data)]
        rebuilt = []
        for i in range(0, len(reads), REBUILD_CHUNKS):
            batch = reads[i : i + REBUILD_CHUNKS]
            stored = [self._decode(read, chunk) for read, chunk in zip(batch, data[i : i + REBUILD_CHUNKS])]
            rebuilt += self._rebuild(batch, stored)
            for array in stored:
                self.cache.release(array)
        return rebuilt

    def _decode(self, read: ChunkRead, data) -> np.ndarray:
        layout = read.layout
        stored = self.cache.buffer(layout.codecs.stored_shape(layout.chunk), layout.numpy_dtype)
        try:
            layout.codecs.decode_into(data, stored)
        except CorruptChunkError as exc:
            raise CorruptChunkError(f"corrupt chunk: {read.describe()} of {storage.describe(self.store)}: {exc}") from None
        except Exception as exc:  # a codec's own error on damaged bytes
            raise CorruptChunkError(f"corrupt chunk: {read.describe()} of {storage.describe(self.store)} "
                                    f"cannot be decoded: {exc}") from exc
        return stored

    def _companions(self, name: str, coords: list[tuple[int, ...]], valid_rows: int) -> tuple[list, list[bool]]:
        """The decoded chunks (stored order) of another main-tier array at each of ``coords`` (all
        in one of its shards), via the cache; and which of them the caller owns (to release)."""
        layout = self.main_layouts[name]
        reads = [ChunkRead(layout, c, (), (), valid_rows) for c in coords]
        found = [self.cache.get(read.key) for read in reads]
        missing = [read for read, array in zip(reads, found) if array is None]
        decoded = iter(self._decoded(missing, self._fetch(missing)) if missing else ())
        arrays, owned = [], []
        for read, array in zip(reads, found):
            if array is None:
                array = next(decoded)
                owned.append(not self.cache.put(read.key, array))
            else:
                owned.append(False)
            arrays.append(array)
        return arrays, owned

    def _rebuild(self, reads: list[ChunkRead], residuals: list[np.ndarray]) -> list[np.ndarray]:
        """Chunks of one shard of a predicted moment from their residuals, the same chunks of the
        gradients and the rows' gradient norms (the rows are the stored order's last axis when
        transposed), rebuilt together."""
        layout, valid_rows = reads[0].layout, reads[0].valid_rows
        prediction = layout.prediction
        grads, own_grads = self._companions(prediction.grads, [read.coords for read in reads], valid_rows)
        (norms,), own_norms = self._companions(prediction.grad_norm, [reads[0].coords[:1]], valid_rows)
        axis = layout.codecs.transpose.order.index(0) if layout.codecs.transpose else 0
        # Rows first, each chunk moved on its own (a chunk's transpose stays in the CPU's cache;
        # the whole shard's at once would not).
        first = (residuals[0].shape[axis], len(reads), *np.delete(residuals[0].shape, axis))
        stacked = {name: np.empty(first, arrays[0].dtype) for name, arrays in (("res", residuals), ("grads", grads))}
        for i, (res, grad) in enumerate(zip(residuals, grads)):
            stacked["res"][:, i] = np.moveaxis(res, axis, 0)
            stacked["grads"][:, i] = np.moveaxis(grad, axis, 0)
        rebuilt = prediction.rebuild(stacked["res"], stacked["grads"], norms)
        for array, own in zip([*grads, norms], [*own_grads, *own_norms]):
            if own:
                self.cache.release(array)
        return [np.ascontiguousarray(np.moveaxis(rebuilt[:, i], 0, axis)) for i in range(len(reads))]

    def _fetch(self, reads: list[ChunkRead]) -> list[bytes]:
        """The encoded bytes of each chunk of one shard: the whole shard when most of it is needed."""
        layout = reads[0].layout
        key = layout.shard_key(reads[0].shard)
        n_chunks = int(np.prod(layout.chunks_per_shard))
        index_bytes = ShardIndex.nbytes(n_chunks)
        whole = 2 * len(reads) >= n_chunks
        data = storage.get_view(self.store, key, suffix=None if whole else index_bytes)
        if data is None:
            raise self._missing(key, reads[0])
        spans = self._spans(data[-index_bytes:], n_chunks, key, reads)
        if whole:
            return [data[start:end] for start, end in spans]
        return storage.get_ranges(self.store, key, spans)

    def _spans(self, tail, n_chunks: int, key: str, reads: list[ChunkRead]) -> list[tuple[int, int]]:
        """Where each read's chunk lies in the shard, from the shard's index (``tail``)."""
        try:
            index = ShardIndex.decode(tail, n_chunks)
        except CorruptChunkError as exc:
            raise CorruptChunkError(f"corrupt shard index of '{key}' in {storage.describe(self.store)} "
                                    f"(holds {reads[0].describe()} and its neighbours): {exc}") from None
        spans = [index.span(read.inner_index) for read in reads]
        for span, read in zip(spans, reads):
            if span is None:
                raise CorruptChunkError(f"missing chunk: {read.describe()} of {storage.describe(self.store)} holds "
                                        f"committed rows but shard '{key}' has no such chunk")
        return spans

    def _missing(self, key: str, read: ChunkRead) -> CorruptChunkError:
        return CorruptChunkError(f"missing shard: '{key}' of {storage.describe(self.store)} holds committed rows "
                                 f"({read.describe()}) but does not exist; run `wordystore verify` to see the damage")

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def _copy(read: ChunkRead, stored: np.ndarray, out: np.ndarray) -> None:
    """Copy the selected part of one decoded chunk (stored order) into the output, bit for bit
    (a bfloat16 output takes a chunk stored as uint16 through a view, never a numeric cast)."""
    if out.dtype != stored.dtype:
        out = out.view(stored.dtype)
    chunk = read.layout.codecs.transpose.to_logical(stored) if read.layout.codecs.transpose else stored
    local = read.local
    if sum(1 for s in local if not isinstance(s, slice)) > 1:  # several index arrays: orthogonal
        local = np.ix_(*[np.arange(n)[s] if isinstance(s, slice) else s for s, n in zip(local, chunk.shape)])
    out[read.out] = chunk[local]
