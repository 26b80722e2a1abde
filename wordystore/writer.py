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
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import shutil
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import metadata as importlib_metadata
from typing import Callable, Mapping

import numpy as np
import torch

from wordystore import format, reading, storage
from wordystore.errors import AppendError, FormatError, ReadOnlyError, WriterFailedError
from wordystore.kinds import Kind, check_kind_name, numpy_to_torch, scalar_value, torch_to_numpy
from wordystore.storage import WriterLock, as_store, describe, local_root

StateProvider = Callable[[], "tuple[dict[str, torch.Tensor], dict]"]


def library_versions() -> dict[str, str]:
    names = ("wordystore", "zarr", "numcodecs", "pcodec", "numpy", "torch", "transformers", "safetensors", "ml_dtypes")
    versions = {}
    for name in names:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            pass
    return versions


def _check_token_set(name: str, ids, vocab: int | None) -> np.ndarray:
    check_kind_name(name)
    ids = np.asarray(torch_to_numpy(ids) if isinstance(ids, torch.Tensor) else ids)
    if ids.dtype == bool:
        raise ValueError(f"token set {name!r}: give token ids, not a boolean mask (use np.flatnonzero(mask))")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token set {name!r}: token ids must be integers, got dtype {ids.dtype}")
    ids = np.unique(ids.astype(np.int64))
    if ids.size and (ids[0] < 0 or (vocab is not None and ids[-1] >= vocab)):
        raise ValueError(f"token set {name!r}: ids must lie in [0, {vocab}); got {ids[0]}..{ids[-1]}")
    return ids


def _vocab_size(kinds: Mapping[str, Kind]) -> int | None:
    """Length of the ``token`` axis shared by the kinds that have one."""
    lengths = {k.shape[k.dims.index("token")] for k in kinds.values() if "token" in k.dims}
    if len(lengths) > 1:
        raise ValueError(f"kinds disagree on the length of the token axis: {sorted(lengths)}")
    return lengths.pop() if lengths else None


def create(
    where,
    kinds: Mapping[str, Kind],
    *,
    token_sets: Mapping[str, object] | None = None,
    config: Mapping | None = None,
    profile: str = "compact",
    overwrite: bool = False,
    durable: bool = True,
    keep_states: int = 1,
    block_rows: int = format.BLOCK_ROWS,
    chunk_rows: int = format.CHUNK_ROWS,
    predictions: Mapping[str, format.AdamPrediction] | None = None,
) -> "TrajectoryWriter":
    """Create a trajectory at ``where`` (a directory path, a URL or a zarr store) and open it for appending.

    ``kinds`` maps each tensor kind's name to its per-step :class:`Kind`; ``token_sets`` maps names
    to token ids; ``config`` is any JSON-serialisable dict (the run's full config); ``profile`` is
    ``"compact"`` (pcodec, the smallest) or ``"portable"`` (standard zarr codecs, for tensorstore).
    With ``durable``, data is fsynced before each commit record on local stores. The writer holds
    ``block_rows`` rows in memory; the main tier keeps ``chunk_rows`` rows per chunk (longer
    compresses better, shorter makes one-row reads cheaper; docs/format.md). ``predictions``
    (e.g. :func:`wordystore.adam_predictions`) lets the compact profile store Adam's moments as
    residuals against a replay of the optimizer: several times smaller, still bit for bit. Everything is
    checked before anything is written; a create that fails leaves nothing behind.

    >>> with wordystore.create("run.zarr", wordystore.seed_kinds(50257, 64)) as w:
    ...     w.append(0, embeddings=..., grads=..., ...)
    """
    if not kinds:
        raise ValueError("create() needs at least one kind, e.g. wordystore.seed_kinds(vocab_size, hidden_dim)")
    kinds = {check_kind_name(name): kind for name, kind in kinds.items()}
    format.Profile(profile)
    format.check_rows(block_rows, chunk_rows)
    predictions = dict(predictions or {})
    format.check_predictions(predictions, kinds)
    vocab = _vocab_size(kinds)
    sets = {name: _check_token_set(name, ids, vocab) for name, ids in (token_sets or {}).items()}
    config = dict(config or {})
    try:
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config must be JSON-serialisable (no NaN): {exc}") from None
    if not isinstance(keep_states, int) or keep_states < 1:
        raise ValueError(f"keep_states must be a positive int, got {keep_states!r}")

    store = as_store(where, read_only=False)
    if store.read_only:
        raise ReadOnlyError(f"cannot create a trajectory in {describe(store)}: the store is read-only")
    _refuse_existing(store, overwrite)  # before the lock, whose file would change the store
    root = local_root(store)
    made_dir = root is not None and not root.exists()
    lock = WriterLock(store)
    try:
        _refuse_existing(store, overwrite)  # again, now that no other writer can be making it
    except BaseException:
        lock.release()
        raise
    try:
        storage.clear_store(store)
        meta = format.Metadata(
            kinds=kinds, profile=profile, token_sets=tuple(sorted(sets)), config=config, versions=library_versions(),
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            block_rows=block_rows, chunk_rows=chunk_rows, predictions=predictions,
        )
        format.write_json(store, f"{format.HOT_GROUP}/zarr.json", format.GROUP_JSON)
        for name, kind in meta.arrays().items():
            format.write_layout(store, format.Profile(profile).main_layout(name, kind, 0, chunk_rows,
                                                                           predictions.get(name)))
            format.write_layout(store, format.Profile(profile).hot_layout(name, kind, 0, block_rows))
        if sets:
            format.write_json(store, f"{format.TOKEN_SETS_GROUP}/zarr.json", format.GROUP_JSON)
        for name, ids in sets.items():
            _write_token_set(store, name, ids)
        format.write_metadata(store, meta)
        format.write_commit(store, format.CommitRecord(), durable=durable)  # last: the store is complete
        return TrajectoryWriter(store, lock, durable, keep_states)
    except BaseException:  # remove what this call wrote (the refusals above have written nothing)
        try:
            storage.clear_store(store)
        finally:
            lock.release()
            if made_dir:
                shutil.rmtree(root, ignore_errors=True)
        raise


def _refuse_existing(store, overwrite: bool) -> None:
    if storage.exists(store, "zarr.json") and not (overwrite or _abandoned(store)):
        raise FileExistsError(f"{describe(store)} already holds a zarr store; pass overwrite=True (--overwrite) "
                              "to replace it")


@contextlib.contextmanager
def building(where, kinds: Mapping[str, Kind], *, overwrite: bool = False, **create_args):
    """``create`` for commands that build a whole store (convert, import, stitch). A local store
    is built under a temporary name beside ``where`` and renamed into place when complete: a
    failed build leaves nothing behind, and an existing store (with ``overwrite``) stays intact
    until its replacement is whole.

    >>> with building("out.zarr", kinds, config=cfg) as w:
    ...     w.bulk_append(steps, read_tile)
    """
    final = as_store(where, read_only=False)
    _refuse_existing(final, overwrite)
    root = local_root(final)
    target = where if root is None else root.with_name(f".{root.name}.{os.getpid()}.partial")
    writer = create(target, kinds, overwrite=True, **create_args)
    try:
        yield writer
        writer.close()
    except BaseException:
        writer._failure = writer._failure or RuntimeError("build abandoned")
        try:
            writer.close()
        except WriterFailedError:
            pass
        storage.clear_store(writer._store)
        if root is not None:
            shutil.rmtree(target, ignore_errors=True)
        raise
    if root is not None:
        _swap_into_place(target, root, overwrite)


def _swap_into_place(built, root, overwrite: bool) -> None:
    """Rename the built store to ``root``; an old store there is moved aside first (under its
    writer lock, so no writer is using it) and deleted only once the new one is in place."""
    if not root.exists():
        os.replace(built, root)
        return
    old_lock = WriterLock(as_store(root, read_only=False))
    try:
        _refuse_existing(as_store(root, read_only=True), overwrite)
        aside = root.with_name(f".{root.name}.{os.getpid()}.old")
        os.replace(root, aside)
        os.replace(built, root)
    finally:
        old_lock.release()
    shutil.rmtree(aside, ignore_errors=True)


def _abandoned(store) -> bool:
    """A create that was killed before its commit record: metadata and token sets (which create
    writes), maybe, but never a row."""
    return not storage.exists(store, format.COMMIT_KEY) and not any(
        "/c/" in key and not key.startswith(f"{format.TOKEN_SETS_GROUP}/") for key in storage.list_prefix(store, ""))


def _write_token_set(store, name: str, ids: np.ndarray) -> None:
    layout = format.token_set_layout(name, ids.size)
    format.write_layout(store, layout)
    for coords in np.ndindex(*layout.shard_grid()):
        storage.put(store, layout.shard_key(coords), layout.encode_shard(ids[layout.shard_region(coords)]))


def resume(where, *, durable: bool = True, keep_states: int = 1) -> "TrajectoryWriter":
    """Open an existing trajectory to append after its last committed row.

    Rows a writer had not committed when it died are ignored (and overwritten); committed rows are
    never touched. A store whose commit record is missing or damaged is refused: see
    ``wordystore verify --repair``.
    """
    store = as_store(where, read_only=False)
    if store.read_only:
        raise ReadOnlyError(f"cannot append to {describe(store)}: the store is read-only")
    if not storage.exists(store, "zarr.json"):  # before the lock, which would make the directory
        raise FileNotFoundError(f"no trajectory at {describe(store)} to resume; wordystore.create() makes one")
    lock = WriterLock(store)
    try:
        return TrajectoryWriter(store, lock, durable, keep_states)
    except BaseException:
        lock.release()
        raise


@dataclasses.dataclass
class _State:
    """A resume state captured after the row ``row`` was appended, waiting for that row's commit."""

    row: int
    step: int
    tensors: dict[str, torch.Tensor]
    info: dict


class TrajectoryWriter:
    """Appends steps to one trajectory. Use :func:`create` or :func:`resume` to get one."""

    def __init__(self, store, lock: WriterLock, durable: bool, keep_states: int = 1):
        self._store, self._lock = store, lock
        self._durable = durable and local_root(store) is not None
        self._keep_states = keep_states
        self._meta = format.read_metadata(store)
        self.kinds = dict(self._meta.kinds)
        self.block_rows, self.chunk_rows = self._meta.block_rows, self._meta.chunk_rows
        self._record = format.read_commit(store)
        self._record_lock = threading.Lock()
        self.last_step = self._record.last_step
        self._hot = {name: format.read_layout(store, f"{format.HOT_GROUP}/{name}") for name in self._meta.arrays()}
        self._main = {name: format.read_layout(store, name) for name in self._meta.arrays()}
        format.check_arrays(store, self._meta, self._record, {name: (self._main[name], self._hot[name]) for name in self._main})

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
        self._pending_state: _State | None = None
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
            if value.is_cuda:  # any host-side read of the ring waits for this copy first (_settle)
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
                self._main = write_main_rows(self._store, self._main, self._meta.arrays(), shifted, start, stop,
                                             pool, self._durable)
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

    def add_token_set(self, name: str, ids) -> None:
        """Store a named set of token ids (sorted, unique) with the trajectory."""
        self._check_open()
        ids = _check_token_set(name, ids, _vocab_size(self.kinds))
        if not self._meta.token_sets:
            format.write_json(self._store, f"{format.TOKEN_SETS_GROUP}/zarr.json", format.GROUP_JSON)
        _write_token_set(self._store, name, ids)
        self._set_metadata(token_sets=tuple(sorted({*self._meta.token_sets, name})))

    def update_config(self, **entries) -> None:
        """Add or replace entries of the stored config (e.g. a summary written at the end of a run)."""
        self._check_open()
        config = {**self._meta.config, **entries}
        try:
            json.dumps(config, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"config must be JSON-serialisable (no NaN): {exc}") from None
        self._set_metadata(config=config)

    @property
    def vocab_size(self) -> int | None:
        """Length of the ``token`` axis shared by the kinds that have one."""
        return _vocab_size(self.kinds)

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
        reader = reading.ChunkReader(self._store, threads=1, main_layouts=self._main)
        tiers = {name: [reading.Tier(self._main[name], 0, self._record.compacted_rows),
                        reading.Tier(self._hot[name], self._record.compacted_rows, self.committed)]
                 for name in self._slots}
        for name, slots in self._slots.items():
            block = reading.empty((rows, *slots.shape[1:]), self._meta.arrays()[name].numpy_dtype)
            fetch = (slice(self._first_row, self.committed, 1), *(slice(0, n, 1) for n in block.shape[1:]))
            reader.read_into(reading.plan_reads(tiers[name], fetch), block)
            slots[:rows] = numpy_to_torch(block)
        reader.close()
        self._filled = rows

    def _settle(self) -> None:
        """Wait for copies from a GPU into the ring: every host-side read of the ring calls this first."""
        if self._cuda_event is not None:
            self._cuda_event.synchronize()
            self._cuda_event = None

    def _capture_state(self) -> None:
        tensors, info = self._state_provider()
        json.dumps(info, allow_nan=False)
        copies = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
        self._pending_state = _State(self._first_row + self._filled - 1, self.last_step, copies, info)

    def _make_room(self) -> None:
        """Before filling a slot: if the ring is full, wait for the block in flight and reclaim its slots."""
        if self._filled == len(next(iter(self._slots.values()))):
            self._wait_in_flight()

    def _collect_finished(self) -> None:
        if self._in_flight is not None and self._in_flight[0].done():
            self._wait_in_flight()

    def _wait_in_flight(self) -> None:
        if self._in_flight is None:
            return
        future, n = self._in_flight
        self._in_flight = None
        try:
            future.result()
        except BaseException as exc:
            self._failure = exc
            raise WriterFailedError(
                f"the background writer of {describe(self._store)} failed; {self.committed} rows are committed"
            ) from exc
        if n < self.block_rows:  # a flushed partial block stays in the ring
            return
        rest = self._filled - n
        self._settle()
        for buffer in self._slots.values():
            buffer[:rest] = buffer[n : self._filled].clone()
        self._first_row += n
        self._filled = rest
        if self._filled >= self.block_rows:
            self._submit(self.block_rows)

    def _submit(self, n: int) -> None:
        self._settle()
        block = {name: torch_to_numpy(buffer[:n]) for name, buffer in self._slots.items()}
        state = self._pending_state
        if state is not None and state.row == self._first_row + n - 1:
            self._pending_state = None
        else:
            state = None
        self._in_flight = (self._pool.submit(self._write_block, self._first_row, block, state), n)

    def _write_block(self, first_row: int, block: dict[str, np.ndarray], state: _State | None) -> None:
        """Block thread: write rows ``first_row ...`` of every array to the hot tier, then commit them."""
        end = first_row + len(block[format.STEPS_ARRAY])
        keys = []
        for name, data in block.items():
            layout = self._hot[name].with_rows(max(end, self._hot[name].shape[0]))
            for coords in np.ndindex(*layout.shard_grid()[1:]):
                coords = (first_row // self.block_rows, *coords)
                region = layout.shard_region(coords)
                key = layout.shard_key(coords)
                storage.put(self._store, key, layout.encode_shard(data[(slice(None), *region[1:])]))
                keys.append(key)
            self._hot[name] = layout
            format.write_layout(self._store, layout)
            keys.append(f"{layout.path}/zarr.json")
        if state is not None:
            keys.append(self._write_state(state))
        if self._durable:
            storage.sync_to_disk(self._store, keys)
        states = self._record.states + ((_state_entry(state),) if state else ())
        self._commit(committed_rows=end, last_step=int(block[format.STEPS_ARRAY][-1]),
                     states=states[-self._keep_states:])
        for old in states[: -self._keep_states]:
            storage.delete(self._store, old["key"])
        if self.committed - self._record.compacted_rows >= self.chunk_rows and (
                self._compaction is None or self._compaction.done()):
            self._compaction = self._compactor.submit(self._compact)

    def _write_state(self, state: _State) -> str:
        from safetensors.torch import save

        key = _state_entry(state)["key"]
        metadata = {"info": json.dumps(state.info), "row": str(state.row), "step": str(state.step)}
        storage.put(self._store, key, save(state.tensors, metadata=metadata))
        return key

    def _commit(self, **changes) -> None:
        """Replace the commit record (both background threads go through here, one at a time)."""
        with self._record_lock:
            self._record = dataclasses.replace(self._record, **changes)
            format.write_commit(self._store, self._record, durable=self._durable)

    def _set_metadata(self, **changes) -> None:
        self._meta = dataclasses.replace(self._meta, **changes)
        format.write_metadata(self._store, self._meta, durable=self._durable)

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
        reader = reading.ChunkReader(self._store, threads=1, main_layouts=self._main)

        def read_tile(name: str, fetch: tuple, out: np.ndarray) -> None:
            tiers = [reading.Tier(self._main[name], 0, record.compacted_rows),
                     reading.Tier(self._hot[name], record.compacted_rows, record.committed_rows)]
            reader.read_into(reading.plan_reads(tiers, fetch), out)

        self._main = write_main_rows(self._store, self._main, self._meta.arrays(), read_tile, start, stop, pool,
                                     self._durable)
        self._commit(compacted_rows=stop)
        reader.close()
        # The hot copies of rows now compacted are redundant: delete the blocks whose committed
        # rows all lie below ``stop`` (the last block of a final compaction too: a resumed writer
        # reloads its rows from the main tier).
        for name, hot in self._hot.items():
            for block in range(start // self.block_rows, math.ceil(stop / self.block_rows)):
                for coords in np.ndindex(*hot.shard_grid()[1:]):
                    storage.delete(self._store, hot.shard_key((block, *coords)))


TileReader = Callable[[str, tuple, np.ndarray], None]


def write_main_rows(store, layouts: dict[str, format.ArrayLayout], arrays: dict[str, Kind], read_tile: TileReader,
                    start: int, stop: int, pool, durable: bool) -> dict[str, format.ArrayLayout]:
    """Encode rows ``[start, stop)`` (one chunk of rows, ``start`` on a chunk boundary) of every
    array into main-tier shards, one shard per task on ``pool``; ``read_tile(name, fetch, out)``
    fills ``out`` with the orthogonal selection ``fetch`` of the rows' data. Returns the layouts
    grown to ``stop`` rows (their ``zarr.json`` written; the caller commits)."""
    jobs, grown = [], {}
    for name, kind in arrays.items():
        layout = layouts[name].with_rows(max(stop, layouts[name].shape[0]))
        grown[name] = layout
        for coords in np.ndindex(*layout.shard_grid()[1:]):
            jobs.append(pool.submit(_encode_main_shard, store, layout, kind, read_tile, name,
                                    (start // layout.shard[0], *coords), stop))
    keys = [job.result() for job in jobs]
    for layout in grown.values():
        format.write_layout(store, layout)
        keys.append(f"{layout.path}/zarr.json")
    if durable:
        storage.sync_to_disk(store, keys)
    return grown


def _encode_main_shard(store, layout: format.ArrayLayout, kind: Kind, read_tile: TileReader, name: str,
                       coords: tuple[int, ...], stop: int) -> str:
    region = layout.shard_region(coords)
    fetch = (slice(region[0].start, stop, 1), *(slice(r.start, r.stop, 1) for r in region[1:]))
    data = np.zeros((stop - region[0].start, *(r.stop - r.start for r in region[1:])), kind.numpy_dtype)
    read_tile(name, fetch, data)
    prediction = layout.prediction
    if prediction is not None:  # the shard's rows start a chunk: residuals count from there
        grads, norms = np.empty_like(data), np.empty(len(data), np.float32)
        read_tile(prediction.grads, fetch, grads)
        read_tile(prediction.grad_norm, fetch[:1], norms)
        data = prediction.residuals(data, grads, norms)
    key = layout.shard_key(coords)
    storage.put(store, key, layout.encode_shard(data))
    return key


def _state_entry(state: _State) -> dict:
    return {"row": state.row, "step": state.step, "key": f"{format.STATE_PREFIX}/{state.row:012d}.safetensors"}


def _lower_priority(niceness: int) -> None:
    """Lower the calling thread's CPU priority (Linux sets it per thread; elsewhere nothing)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):
        pass


def load_state(where) -> tuple[dict[str, torch.Tensor], dict, int] | None:
    """The newest resume state a writer committed with the trajectory at ``where``: ``(tensors,
    info, step)``, or None if it has none. Safe to call on any store: safetensors and JSON only.

    >>> tensors, info, step = wordystore.load_state("runs/wb1b.zarr")
    """
    from safetensors.torch import load

    store = as_store(where, read_only=True)
    record = format.read_commit(store)
    if not record.states:
        return None
    newest = record.states[-1]
    data = storage.get(store, newest["key"])
    if data is None:
        raise FormatError(f"{describe(store)}: resume state {newest['key']} named by {format.COMMIT_KEY} is missing")
    try:
        header = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])["__metadata__"]  # u64 length, JSON
        if (int(header["row"]), int(header["step"])) != (newest["row"], newest["step"]):
            raise ValueError(f"it holds row {header['row']}, step {header['step']}; {format.COMMIT_KEY} says "
                             f"row {newest['row']}, step {newest['step']}")
        return load(data), json.loads(header["info"]), int(newest["step"])
    except Exception as exc:  # damaged bytes: safetensors raises its own SafetensorError, json and struct theirs
        raise FormatError(f"{describe(store)}: resume state {newest['key']} is damaged ({type(exc).__name__}: {exc}); "
                          f"`wordystore verify {describe(store)} --repair` drops it from {format.COMMIT_KEY}") from None
