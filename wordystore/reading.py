"""The read path: a plan of chunk reads computed without I/O, then a parallel decode straight into
the output.

:func:`plan_reads` turns an orthogonal selection (per axis a slice or sorted unique positions, as
:func:`wordystore.indexing.plan` produces) into one :class:`ChunkRead` per inner chunk it touches:
which chunk, which part of it, and where that part goes in the output. Rows come from two tiers
(main below ``compacted_rows``, hot above; see :mod:`wordystore.format`). :class:`ChunkReader`
then fetches each shard's bytes (the whole shard, or its index and the needed chunks), decodes
every chunk on a pool of threads (the codecs release the GIL) and copies the selected part into
the output, gathering the token selection as it goes. Decoded chunks go through a bounded LRU
cache, so iterating over steps or re-running a cell decodes nothing twice.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from wordystore import storage
from wordystore.codecs import EMPTY, decode_shard_index, shard_index_nbytes
from wordystore.errors import CorruptChunkError
from wordystore.format import ArrayLayout

DEFAULT_CACHE_BYTES = int(os.environ.get("WORDYSTORE_CACHE_BYTES", 2 << 30))
THREADS = os.cpu_count() or 1


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


def empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised output array. numpy already asks the kernel for transparent huge pages for
    large allocations (madvise), which keeps the first write's page faults few."""
    return np.empty(shape, dtype)


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

    def __init__(self, store, cache: ChunkCache | None = None, threads: int | None = None,
                 main_layouts: dict[str, ArrayLayout] | None = None):
        self.store = store
        self.cache = cache if cache is not None else ChunkCache(0)
        self.main_layouts = main_layouts or {}  # name -> main-tier layout: what predicted arrays rebuild from
        self.threads = threads or THREADS
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="wordystore-read")

    def read_into(self, reads: list[ChunkRead], out: np.ndarray) -> None:
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
            key = (read.layout.path, read.coords, read.valid_rows)
            cached = self.cache.get(key)
            if cached is None:
                pending.append(read)
            else:
                _copy(read, cached, out)
        if not pending:
            return
        for read, data in zip(pending, self._fetch(pending)):
            stored = self._decoded(read, data)
            _copy(read, stored, out)
            if not self.cache.put((read.layout.path, read.coords, read.valid_rows), stored):
                self.cache.release(stored)

    def _decoded(self, read: ChunkRead, data) -> np.ndarray:
        """The chunk's values in stored order (a predicted moment rebuilt from its residuals)."""
        stored = self._decode(read, data)
        if read.layout.prediction is None:
            return stored
        rebuilt = self._rebuild(read, stored)
        self.cache.release(stored)
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

    def _companion(self, name: str, coords: tuple[int, ...], valid_rows: int) -> tuple[np.ndarray, bool]:
        """The decoded chunk (stored order) of another main-tier array at ``coords``, via the
        cache; and whether the caller owns it (to release after use)."""
        layout = self.main_layouts[name]
        read = ChunkRead(layout, coords, (), (), valid_rows)
        key = (layout.path, coords, valid_rows)
        stored = self.cache.get(key)
        if stored is not None:
            return stored, False
        (data,) = self._fetch([read])
        stored = self._decoded(read, data)
        return stored, not self.cache.put(key, stored)

    def _rebuild(self, read: ChunkRead, residuals: np.ndarray) -> np.ndarray:
        """A predicted moment's chunk from its residuals, the same chunk of the gradients and
        the rows' gradient norms (the rows are the stored order's last axis when transposed)."""
        prediction, layout = read.layout.prediction, read.layout
        grads, own_grads = self._companion(prediction.grads, read.coords, read.valid_rows)
        norms, own_norms = self._companion(prediction.grad_norm, read.coords[:1], read.valid_rows)
        axis = layout.codecs.transpose.order.index(0) if layout.codecs.transpose else 0
        rebuilt = prediction.rebuild(residuals, grads, norms, axis=axis)
        for array, own in ((grads, own_grads), (norms, own_norms)):
            if own:
                self.cache.release(array)
        return rebuilt

    def _fetch(self, reads: list[ChunkRead]) -> list[bytes]:
        """The encoded bytes of each chunk of one shard: the whole shard when most of it is needed."""
        layout = reads[0].layout
        key = layout.shard_key(reads[0].shard)
        n_chunks = int(np.prod(layout.chunks_per_shard))
        index_bytes = shard_index_nbytes(n_chunks)
        if 2 * len(reads) >= n_chunks:
            shard = storage.get(self.store, key)
            if shard is None:
                raise self._missing(key, reads[0])
            index = self._index(shard[-index_bytes:], n_chunks, key, reads[0])
            spans = [index[r.inner_index] for r in reads]
            self._check_present(spans, key, reads)
            view = memoryview(shard)
            return [view[int(o) : int(o) + int(n)] for o, n in spans]
        tail = storage.get(self.store, key, suffix=index_bytes)
        if tail is None:
            raise self._missing(key, reads[0])
        index = self._index(tail, n_chunks, key, reads[0])
        spans = [index[r.inner_index] for r in reads]
        self._check_present(spans, key, reads)
        return storage.get_ranges(self.store, key, [(int(o), int(o) + int(n)) for o, n in spans])

    def _index(self, tail, n_chunks: int, key: str, read: ChunkRead) -> np.ndarray:
        try:
            return decode_shard_index(tail, n_chunks)
        except CorruptChunkError as exc:
            raise CorruptChunkError(f"corrupt shard index of '{key}' in {storage.describe(self.store)} "
                                    f"(holds {read.describe()} and its neighbours): {exc}") from None

    def _check_present(self, spans, key: str, reads: list[ChunkRead]) -> None:
        for (offset, _), read in zip(spans, reads):
            if offset == EMPTY:
                raise CorruptChunkError(f"missing chunk: {read.describe()} of {storage.describe(self.store)} holds "
                                        f"committed rows but shard '{key}' has no such chunk")

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
