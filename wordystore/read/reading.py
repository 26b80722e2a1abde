"""The read path of a trajectory: which tier holds each row, a plan of chunk reads computed without
I/O, then a parallel decode straight into the output.

:class:`StoreReader` is a trajectory's arrays as one commit record admits them, and every read of
a trajectory goes through it: it takes each row from the tier the record puts it in
(:class:`wordystore.format.records.RowTiers`) and catches up with a running writer's compaction (below).
:func:`plan_reads` turns an orthogonal selection (per axis a slice or sorted unique positions, as
:func:`wordystore.read.indexing.plan` produces) into one :class:`ChunkRead` per inner chunk it touches:
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
import functools
import itertools
import math
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cachetools
import numpy as np

from wordystore.errors import CorruptChunkError, FormatError
from wordystore.format.codecs import ShardTail
from wordystore.format.keys import STEPS_ARRAY, TIERS, token_set_problem, vocab_size
from wordystore.format.layout import ArrayLayout
from wordystore.format.metadata import Metadata, rows_problem, width_problem
from wordystore.format.records import CommitRecord, check_arrays
from wordystore.store import json_documents, storage

DEFAULT_CACHE_BYTES = int(os.environ.get("WORDYSTORE_CACHE_BYTES", 2 << 30))
THREADS = os.cpu_count() or 1
REBUILD_CHUNKS = 4  # a predicted moment's chunks rebuilt at once (ChunkReader._decoded)


class StoreReader:
    """A trajectory's arrays as one commit record admits them: the metadata, the record, each array's
    (main, hot) layouts, and the reads. A :class:`wordystore.Trajectory` is a face over one; the
    writer reads the rows it compacts or reloads through one too."""

    def __init__(
        self,
        store,
        meta: Metadata,
        record: CommitRecord,
        layouts: dict[str, tuple[ArrayLayout, ArrayLayout]],
        cache: ChunkCache | None = None,
        threads: int | None = None,
    ):
        self.store, self.meta = store, meta
        self._chunks = ChunkReader(store, cache, threads)
        self._adopt(record, layouts)

    @classmethod
    def open(cls, store, cache_bytes: int = DEFAULT_CACHE_BYTES, threads: int | None = None) -> StoreReader:
        """The trajectory in ``store`` as its commit record stands now (see :meth:`refresh`), read
        on ``threads`` threads (default: every core)."""
        reader = cls(store, json_documents.read_metadata(store), CommitRecord(), {}, ChunkCache(cache_bytes), threads)
        reader.refresh()
        return reader

    def refresh(self) -> None:
        """Re-read the commit record and the arrays' layouts, checked against the metadata and
        against the shards present (:func:`check_held`)."""
        record = json_documents.read_commit(self.store)
        layouts = json_documents.read_layouts(self.store, self.meta)
        check_arrays(storage.describe(self.store), self.meta, record, layouts)
        check_held(self.store, record, layouts)
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
            raise FormatError(
                f"{where}: recorded_steps are not increasing; the store is damaged (run `wordystore verify {where}`)"
            )
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
        record = json_documents.read_commit(self.store)
        if record.compacted_rows <= self.record.compacted_rows:
            return False
        compacted = min(record.compacted_rows, self.record.committed_rows)
        self._adopt(
            dataclasses.replace(self.record, compacted_rows=compacted),
            {
                name: (json_documents.read_layout(self.store, main.path, main.binding), hot)
                for name, (main, hot) in self.layouts.items()
            },
        )
        return True

    def read_token_set(self, name: str) -> np.ndarray:
        """Token set ``name``'s ids, checked as the writer checked them (sorted, unique, on the token
        axis): a store from someone else may hold any int64 there, and a negative id would index
        from the end of the token axis. FormatError naming the first bad id otherwise."""
        ids = self._chunks.read_whole(json_documents.read_token_set_layout(self.store, self.meta, name))
        problem = token_set_problem(ids, vocab_size(self.meta.kinds))
        if problem:
            where = storage.describe(self.store)
            raise FormatError(f"{where}: token set '{name}' is damaged: {problem} (run `wordystore verify {where}`)")
        return ids

    def uncached(self) -> StoreReader:
        """The same rows, read without a chunk cache (a reader of its own)."""
        return StoreReader(self.store, self.meta, self.record, self.layouts, ChunkCache(0))

    def close(self) -> None:
        """Stop the read threads and drop the chunk cache."""
        self._chunks.close()
        self._chunks.cache.clear()


def check_held(store, record: CommitRecord, layouts: dict[str, tuple[ArrayLayout, ArrayLayout]]) -> None:
    """The shards present (listed, hot tier first) can hold the rows the record admits and the
    shape per row the metadata declares (:func:`wordystore.format.metadata.rows_problem`, :func:`width_problem`):
    what the documents claim is bounded by the files before a read allocates or plans by it; else
    FormatError."""
    if record.committed_rows == 0:
        return
    where = storage.describe(store)
    present = storage.list_prefix(store, "")  # one listing (on object storage, a request per 1,000 keys)
    for name, (main, hot) in layouts.items():
        keys = [key for key in present if key.startswith((hot.chunk_prefix, main.chunk_prefix))]
        problem = width_problem(name, (main, hot), keys) or rows_problem(name, (main, hot), record, keys)
        if problem:
            raise FormatError(
                f"{where}: {problem}; the store is damaged or not what it claims "
                f"(`wordystore verify {where}` lists what it holds)"
            )


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

    @functools.cached_property
    def shard(self) -> tuple[int, ...]:
        return tuple(c // n for c, n in zip(self.coords, self.layout.chunks_per_shard))

    @functools.cached_property
    def key(self) -> tuple:
        """The decoded chunk's key in the cache."""
        return self.layout.path, self.coords, self.valid_rows

    @functools.cached_property
    def inner_index(self) -> int:
        """The chunk's place in its shard's index (C order of the shard's chunk grid)."""
        index = 0
        for c, n in zip(self.coords, self.layout.chunks_per_shard):
            index = index * n + c % n
        return index

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
    """A bounded LRU of decoded chunks (in stored order), keyed by array, chunk and valid rows:
    a ``cachetools.LRUCache`` weighing each chunk by its bytes, behind a lock for the reading threads.

    A decoding thread takes a buffer from :meth:`buffer`; if :meth:`put` declines it (a cache too
    small, or disabled with ``max_bytes=0``) the thread hands it back with :meth:`release` once
    done, and the next decode reuses that warm memory. (It matters little with glibc, which reuses
    freed 1 MiB blocks itself: an uncached scan of the seed run's untrained tokens, 1,182 chunks
    decoded, took 2,400-4,500 page faults with it and 5,300 without, of the 300,000 that fresh
    pages for every chunk would take.)
    Evicted entries are dropped, never reused, since another thread may still be reading one it
    got from :meth:`get`.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.max_bytes = max_bytes
        self._entries = cachetools.LRUCache(max_bytes, getsizeof=lambda array: array.nbytes)
        self._free: dict[tuple, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple) -> np.ndarray | None:
        with self._lock:
            return self._entries.get(key)

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
            self._entries[key] = array  # evicts the least recently used until it fits
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


class ChunkReader:
    """Executes a read plan on a store: fetch, decode in parallel, copy into the output."""

    def __init__(self, store, cache: ChunkCache | None = None, threads: int | None = None, rebuild: bool = True):
        """``rebuild=False``: a predicted kind's chunks come back as their stored residuals, as
        ``verify`` checks them."""
        self.store, self.rebuild = store, rebuild
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

    def _decoded(self, reads: list[ChunkRead], data: list) -> Iterator[np.ndarray]:
        """The values of some chunks of one shard, in stored order, one at a time: the caller copies
        each out while it is still in the CPU's cache and hands its buffer back for the next (all
        of a shard's decoded first would go through memory, and take a buffer each). A predicted
        moment's are rebuilt from their residuals ``REBUILD_CHUNKS`` at a time (one replay of the
        rows for several chunks, not one per chunk: the replay's torch operations take the GIL
        between them, and many small calls do not scale; a few chunks at a time keep its memory to a few MB)."""
        if not reads or not self.rebuild or reads[0].layout.prediction is None:
            for read, chunk in zip(reads, data):
                yield self._decode(read, chunk)
            return
        for i in range(0, len(reads), REBUILD_CHUNKS):
            batch = reads[i : i + REBUILD_CHUNKS]
            stored = [self._decode(read, chunk) for read, chunk in zip(batch, data[i : i + REBUILD_CHUNKS])]
            rebuilt = self._rebuild(batch, stored)
            for array in stored:
                self.cache.release(array)
            yield from rebuilt

    def _decode(self, read: ChunkRead, data) -> np.ndarray:
        layout = read.layout
        stored = self.cache.buffer(layout.codecs.stored_shape(layout.chunk), layout.numpy_dtype)
        try:
            layout.codecs.decode_into(data, stored)
        except CorruptChunkError as exc:
            raise CorruptChunkError(
                f"corrupt chunk: {read.describe()} of {storage.describe(self.store)}: {exc}"
            ) from None
        except Exception as exc:  # a codec's own error on damaged bytes
            raise CorruptChunkError(
                f"corrupt chunk: {read.describe()} of {storage.describe(self.store)} cannot be decoded: {exc}"
            ) from exc
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
        """Chunks of one shard of a predicted kind from their residuals and the same chunks of each of
        its prediction's inputs (the gradients and norms of a moment; a parameter's moments, rebuilt
        in turn, its learning rates and steps; a 0-d input's chunk is its rows'), rebuilt together:
        rows first, the chunks side by side along a new second axis. Each chunk is moved to that
        order on its own (a chunk's transpose stays in the CPU's cache; the whole shard's at once
        would not)."""
        layout, valid_rows = reads[0].layout, reads[0].valid_rows
        prediction = layout.prediction
        inputs, owned = [], []
        for name in prediction.inputs:
            source = self.main_layouts[name]
            coords = [reads[0].coords[:1]] if len(source.chunk) == 1 else [read.coords for read in reads]
            arrays, own = self._companions(name, coords, valid_rows)
            inputs.append(arrays[0] if len(source.chunk) == 1 else _side_by_side(arrays, source))
            owned += [array for array, mine in zip(arrays, own) if mine]
        rebuilt = prediction.rebuild(_side_by_side(residuals, layout), inputs)
        for array in owned:
            self.cache.release(array)
        order = layout.codecs.transpose.order if layout.codecs.transpose else None
        return [
            np.ascontiguousarray(rebuilt[:, i] if order is None else rebuilt[:, i].transpose(order))
            for i in range(len(reads))
        ]

    def _fetch(self, reads: list[ChunkRead]) -> list[bytes]:
        """The encoded bytes of each chunk of one shard (the whole shard when most of it is needed,
        else its tail then the chunks it lists, from one open of a local file), each checked to be
        the chunk its shard binds to that place (format 3)."""
        layout = reads[0].layout
        key = layout.shard_key(reads[0].shard)
        tail = None

        def chunk_spans(data) -> list[tuple[int, int]]:
            nonlocal tail
            tail = self._tail(data[-layout.tail_nbytes :], key, reads)
            return self._spans(tail, key, reads)

        try:
            if 2 * len(reads) >= layout.n_chunks:
                data = storage.get(self.store, key, limit=layout.max_shard_nbytes)
                chunks = None if data is None else [memoryview(data)[a:b] for a, b in chunk_spans(data)]
            else:
                parts = storage.get_tail_then(
                    self.store, key, layout.tail_nbytes, chunk_spans, limit=layout.max_shard_nbytes
                )
                chunks = None if parts is None else parts[1]
        except FormatError as exc:  # not a regular file, or larger than such a shard can be
            raise CorruptChunkError(
                f"unreadable shard: '{key}' of {storage.describe(self.store)} ({reads[0].describe()}): {exc}"
            ) from None
        if chunks is None:
            raise self._missing(key, reads[0])
        for read, chunk in zip(reads, chunks):
            try:
                tail.check_chunk(read.inner_index, chunk)
            except CorruptChunkError as exc:
                raise CorruptChunkError(
                    f"misplaced chunk: {read.describe()} of {storage.describe(self.store)}: {exc}"
                ) from None
        return chunks

    def _tail(self, data, key: str, reads: list[ChunkRead]) -> ShardTail:
        """The shard's index (and binding record), checked to bind it to ``key`` and to hold the
        rows read from it."""
        try:
            tail = reads[0].layout.decode_tail(data, key)
            tail.check_rows(max(read.valid_rows for read in reads))
        except CorruptChunkError as exc:
            raise CorruptChunkError(
                f"corrupt shard: '{key}' of {storage.describe(self.store)} "
                f"(holds {reads[0].describe()} and its neighbours): {exc}"
            ) from None
        return tail

    def _spans(self, tail: ShardTail, key: str, reads: list[ChunkRead]) -> list[tuple[int, int]]:
        """Where each read's chunk lies in the shard, from the shard's index."""
        spans = [tail.index.span(read.inner_index) for read in reads]
        for span, read in zip(spans, reads):
            if span is None:
                raise CorruptChunkError(
                    f"missing chunk: {read.describe()} of {storage.describe(self.store)} holds "
                    f"committed rows but shard '{key}' has no such chunk"
                )
            if span[1] - span[0] > read.layout.max_chunk_nbytes:
                raise CorruptChunkError(
                    f"corrupt shard index: {read.describe()} of {storage.describe(self.store)}: "
                    f"shard '{key}' lists {span[1] - span[0]} bytes for the chunk, more than such "
                    f"a chunk can take"
                )
        return spans

    def _missing(self, key: str, read: ChunkRead) -> CorruptChunkError:
        return CorruptChunkError(
            f"missing shard: '{key}' of {storage.describe(self.store)} holds committed rows "
            f"({read.describe()}) but does not exist; run `wordystore verify` to see the damage"
        )

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


def _side_by_side(chunks: list[np.ndarray], layout: ArrayLayout) -> np.ndarray:
    """Decoded chunks of ``layout`` (each in its stored order) as one array of their rows in
    logical order, the chunks along a new second axis: ``[row, chunk, ...]``."""
    logical = [layout.codecs.transpose.to_logical(c) if layout.codecs.transpose else c for c in chunks]
    out = np.empty((logical[0].shape[0], len(chunks), *logical[0].shape[1:]), logical[0].dtype)
    for i, chunk in enumerate(logical):
        out[:, i] = chunk
    return out
