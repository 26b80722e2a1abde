"""The streaming writer: one ``append`` per training step, compression and I/O in the background.

Steps are copied into a small ring of host buffers (``steps_per_chunk + 1`` steps of every kind:
about 230 MB for the seed config, whatever the step count). Each time a chunk's worth of steps is
buffered, a background thread writes it as whole shards and then rewrites the commit record, so a
step becomes visible to readers only once every kind of it is on disk. The one spare slot lets the
training loop go on while a block is being written; it waits only if a block takes longer than a
training step to compress.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import metadata as importlib_metadata
from typing import Mapping

import numpy as np
import torch
import zarr
from zarr.abc.store import Store

from wordystore import layout
from wordystore.errors import AppendError, FormatError, ReadOnlyError, WriterFailedError
from wordystore.kinds import Kind, check_kind_name, numpy_to_torch, scalar_value, torch_to_numpy
from wordystore.storage import WriterLock, as_store, clear_store, describe, fsync_file, local_root

STEPS_KIND = Kind((), "int64", ())


def library_versions() -> dict[str, str]:
    names = ("wordystore", "zarr", "numcodecs", "numpy", "torch", "transformers", "safetensors", "ml_dtypes")
    versions = {}
    for name in names:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            pass
    return versions


def create(
    where,
    kinds: Mapping[str, Kind],
    *,
    token_sets: Mapping[str, object] | None = None,
    config: Mapping | None = None,
    steps_per_chunk: int = layout.STEPS_PER_CHUNK,
    overwrite: bool = False,
    durable: bool = True,
) -> "TrajectoryWriter":
    """Create a trajectory at ``where`` (a directory path, a URL or a zarr store) and open it for appending.

    ``kinds`` maps each tensor kind's name to its per-step :class:`Kind`; ``token_sets`` maps names
    to token ids; ``config`` is any JSON-serialisable dict (the run's full config). With
    ``durable``, data files are fsynced before each commit record on local stores.
    """
    store = as_store(where, read_only=False)
    if store.read_only:
        raise ReadOnlyError(f"cannot create a trajectory in {describe(store)}: the store is read-only")
    if not kinds:
        raise ValueError("create() needs at least one kind, e.g. wordystore.seed_kinds(vocab_size, hidden_dim)")
    kinds = {check_kind_name(name): kind for name, kind in kinds.items()}
    if not isinstance(steps_per_chunk, int) or steps_per_chunk < 1:
        raise ValueError(f"steps_per_chunk must be a positive int, got {steps_per_chunk!r}")
    config = dict(config or {})
    try:
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config must be JSON-serialisable (no NaN): {exc}") from None
    lock = WriterLock(store)
    try:
        if zarr.core.sync.sync(store.exists("zarr.json")):
            if not overwrite:
                raise FileExistsError(f"{describe(store)} already holds a zarr store; pass overwrite=True or use resume()")
            clear_store(store)
        group = zarr.open_group(store, mode="a")  # empty but for our lock file
        for name, kind in kinds.items():
            layout.encoding_for(name, kind, steps_per_chunk).create_array(group, name, kind)
        layout.encoding_for(layout.STEPS_ARRAY, STEPS_KIND, steps_per_chunk).create_array(
            group, layout.STEPS_ARRAY, STEPS_KIND
        )
        meta = {
            "format": layout.FORMAT_NAME,
            "format_version": layout.FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "steps_per_chunk": steps_per_chunk,
            "kinds": {name: kind.to_json() for name, kind in kinds.items()},
            "token_sets": [],
            "config": config,
            "versions": library_versions(),
        }
        group.attrs[layout.ATTRS_KEY] = meta
        layout.write_commit(store, 0, None)
        writer = TrajectoryWriter(store, group, lock, durable)
        for name, ids in (token_sets or {}).items():
            writer.add_token_set(name, ids)
        return writer
    except BaseException:
        lock.release()
        raise


def resume(where, *, durable: bool = True) -> "TrajectoryWriter":
    """Open an existing trajectory to append after its last committed step.

    Rows past the commit record (a block that was being written when a writer died) are dropped.
    """
    store = as_store(where, read_only=False)
    if store.read_only:
        raise ReadOnlyError(f"cannot append to {describe(store)}: the store is read-only")
    if not zarr.core.sync.sync(store.exists("zarr.json")):  # before the lock, which would make the directory
        raise FileNotFoundError(f"no trajectory at {describe(store)} to resume; wordystore.create() makes one")
    lock = WriterLock(store)
    try:
        group = zarr.open_group(store, mode="r+")
        return TrajectoryWriter(store, group, lock, durable)
    except BaseException:
        lock.release()
        raise


class TrajectoryWriter:
    """Appends steps to one trajectory. Use :func:`create` or :func:`resume` to get one."""

    def __init__(self, store: Store, group: zarr.Group, lock: WriterLock, durable: bool):
        self._store, self._group, self._lock = store, group, lock
        self._durable = durable and local_root(store) is not None
        meta = layout.read_metadata(group, describe(store))
        self.kinds = {name: Kind.from_json(spec) for name, spec in meta["kinds"].items()}
        self.steps_per_chunk = meta["steps_per_chunk"]
        self._arrays = {name: group[name] for name in self.kinds}
        self._steps_array = group[layout.STEPS_ARRAY]

        self.committed = layout.read_committed_steps(store)
        self._truncate_to(self.committed)
        self.last_step = int(self._steps_array[self.committed - 1]) if self.committed else None

        # Ring of host buffers: slot i holds row ``self._first_row + i``.
        capacity = self.steps_per_chunk + 1
        pin = torch.cuda.is_available()
        self._slots = {
            name: torch.empty((capacity, *kind.shape), dtype=kind.torch_dtype, pin_memory=pin)
            for name, kind in self.kinds.items()
        }
        self._slot_steps = np.zeros(capacity, dtype=np.int64)
        self._first_row = self.committed
        self._filled = 0
        self._in_flight: tuple[Future, int] | None = None  # (future, number of slots it holds)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wordystore-writer")
        self._cuda_event = None  # recorded after the last copy from a GPU
        self._failure: BaseException | None = None
        self._closed = False

    # -- public API ------------------------------------------------------------------------------

    def append(self, step: int, **tensors) -> None:
        """Buffer one step: every declared kind, as a torch tensor (any device) or numpy array of
        the kind's shape and dtype; 0-d kinds also take Python numbers."""
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
        for name, value in tensors.items():
            self._check_value(step, name, value)

        self._make_room()
        slot = self._filled
        for name, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                value = numpy_to_torch(np.asarray(value, dtype=self.kinds[name].numpy_dtype))
            self._slots[name][slot].copy_(value.detach(), non_blocking=True)
            if value.is_cuda:  # the background thread waits for this copy before reading the slot
                self._cuda_event = torch.cuda.Event()
                self._cuda_event.record()
        self._slot_steps[slot] = step
        self._filled += 1
        self.last_step = step
        if self._in_flight is None and self._filled == self._block_length():
            self._submit(self._filled)

    def flush(self) -> None:
        """Write and commit every buffered step now; returns when they are visible to readers."""
        self._check_open()
        self._wait_in_flight()
        if self._filled:
            self._submit(self._filled)
            self._wait_in_flight()

    def add_token_set(self, name: str, ids) -> None:
        """Store a named set of token ids (sorted, unique) with the trajectory."""
        self._check_open()
        check_kind_name(name)
        ids = np.unique(torch_to_numpy(ids) if isinstance(ids, torch.Tensor) else np.asarray(ids))
        if ids.dtype == bool:
            raise ValueError(f"token set {name!r}: give token ids, not a boolean mask (use np.flatnonzero(mask))")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"token set {name!r}: token ids must be integers, got dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        vocab = self.vocab_size
        if ids.size and (ids[0] < 0 or (vocab is not None and ids[-1] >= vocab)):
            raise ValueError(f"token set {name!r}: ids must lie in [0, {vocab}); got {ids[0]}..{ids[-1]}")
        sets = self._group.require_group(layout.TOKEN_SETS_GROUP)
        sets.create_array(name, data=ids, chunks=(max(1, ids.size),), overwrite=True)
        meta = dict(self._group.attrs[layout.ATTRS_KEY])
        meta["token_sets"] = sorted(set(meta["token_sets"]) | {name})
        self._group.attrs[layout.ATTRS_KEY] = meta

    def update_config(self, **entries) -> None:
        """Add or replace entries of the stored config (e.g. a summary written at the end of a run)."""
        self._check_open()
        meta = dict(self._group.attrs[layout.ATTRS_KEY])
        meta["config"] = {**meta["config"], **entries}
        json.dumps(meta["config"], allow_nan=False)
        self._group.attrs[layout.ATTRS_KEY] = meta

    @property
    def vocab_size(self) -> int | None:
        """Length of the ``token`` axis shared by the kinds that have one."""
        lengths = {k.shape[k.dims.index("token")] for k in self.kinds.values() if "token" in k.dims}
        if len(lengths) > 1:
            raise FormatError(f"kinds disagree on the length of the token axis: {sorted(lengths)}")
        return lengths.pop() if lengths else None

    def close(self) -> None:
        """Commit every buffered step, stop the background thread and release the lock."""
        if self._closed:
            return
        try:
            if self._failure is None:
                self.flush()
        finally:
            self._closed = True
            self._pool.shutdown(wait=True)
            self._lock.release()
        if self._failure is not None:
            raise WriterFailedError(
                f"writing {describe(self._store)} failed; steps up to {self.committed} rows are committed"
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
        return (
            f"<TrajectoryWriter {describe(self._store)}: {self.committed} steps committed, "
            f"{self._filled} buffered, kinds {list(self.kinds)}>"
        )

    # -- validation ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._failure is not None:
            raise WriterFailedError(
                f"the background writer of {describe(self._store)} failed; {self.committed} steps are committed"
            ) from self._failure
        if self._closed:
            raise ValueError(f"the writer of {describe(self._store)} is closed")
        self._collect_finished()

    def _check_step(self, step) -> int:
        if isinstance(step, torch.Tensor):
            step = step.item()
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise AppendError(f"append: step must be an int, got {type(step).__name__} {step!r}")
        step = int(step)
        if self.last_step is not None and step <= self.last_step:
            raise AppendError(f"append(step={step}): steps must increase; the last step appended is {self.last_step}")
        if not 0 <= step < 2**63:
            raise AppendError(f"append(step={step}): steps must lie in [0, 2**63) (stored as int64)")
        return step

    def _check_value(self, step: int, name: str, value) -> None:
        kind = self.kinds[name]
        if isinstance(value, torch.Tensor):
            shape, dtype, want = tuple(value.shape), value.dtype, kind.torch_dtype
        elif isinstance(value, np.ndarray):
            shape, dtype, want = value.shape, value.dtype, kind.numpy_dtype
        elif kind.shape == () and isinstance(value, (int, float, np.generic)):
            try:
                scalar_value(kind, value)
            except ValueError as exc:
                raise AppendError(f"append(step={step}): kind {name!r}: {exc}") from None
            return
        else:
            raise AppendError(
                f"append(step={step}): kind {name!r} takes a torch tensor or numpy array, got {type(value).__name__}"
            )
        if shape != kind.shape or dtype != want:
            raise AppendError(
                f"append(step={step}): kind {name!r} expects shape {kind.shape} and dtype {kind.dtype}; "
                f"got shape {shape} and dtype {dtype}"
            )

    # -- the ring buffer and the background thread ------------------------------------------------

    def _block_length(self) -> int:
        """Slots in the next block: up to the next chunk boundary, so later blocks fill whole shards."""
        return self.steps_per_chunk - self._first_row % self.steps_per_chunk

    def _make_room(self) -> None:
        """Before filling a slot: if the ring is full, wait for the block in flight and reclaim its slots."""
        if self._in_flight is not None and self._filled == len(self._slot_steps):
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
            self.committed = future.result()
        except BaseException as exc:
            self._failure = exc
            raise WriterFailedError(
                f"the background writer of {describe(self._store)} failed; {self.committed} steps are committed"
            ) from exc
        # Move the slots filled meanwhile to the front; rows of the block just committed are free.
        rest = self._filled - n
        for buffer in self._slots.values():
            buffer[:rest] = buffer[n : self._filled].clone() if rest else buffer[:0]
        self._slot_steps[:rest] = self._slot_steps[n : self._filled]
        self._first_row += n
        self._filled = rest
        if self._filled and self._filled == self._block_length():
            self._submit(self._filled)

    def _submit(self, n: int) -> None:
        views = {name: torch_to_numpy(buffer[:n]) for name, buffer in self._slots.items()}
        steps = self._slot_steps[:n].copy()
        future = self._pool.submit(self._write_block, self._first_row, views, steps, self._cuda_event)
        self._cuda_event = None
        self._in_flight = (future, n)

    def _write_block(self, first_row: int, blocks: dict[str, np.ndarray], steps: np.ndarray, cuda_event) -> int:
        """Background thread: write rows ``first_row ...`` of every array, then commit them."""
        if cuda_event is not None:
            cuda_event.synchronize()
        end = first_row + len(steps)
        arrays = {**self._arrays, layout.STEPS_ARRAY: self._steps_array}
        blocks = {**blocks, layout.STEPS_ARRAY: steps}
        for name, array in arrays.items():
            if array.shape[0] < end:
                array.resize((end, *array.shape[1:]))
            array[first_row:end] = blocks[name]
        if self._durable:
            for array in arrays.values():
                self._fsync_rows(array, first_row, end)
        layout.write_commit(self._store, end, int(steps[-1]))
        return end

    def _fsync_rows(self, array: zarr.Array, start: int, end: int) -> None:
        """fsync the shard files (and metadata) that hold rows [start, end) of a local array."""
        root = local_root(self._store) / array.path
        fsync_file(root / "zarr.json")
        shard = array.shards or array.chunks
        ranges = [range(start // shard[0], (end - 1) // shard[0] + 1)]
        ranges += [range(math.ceil(n / s)) for n, s in zip(array.shape[1:], shard[1:])]
        for coords in itertools.product(*ranges):
            path = root / array.metadata.encode_chunk_key(coords)
            if path.exists():
                fsync_file(path)

    def _truncate_to(self, rows: int) -> None:
        """Drop rows past the commit record (left by a writer that died mid-block)."""
        for array in (*self._arrays.values(), self._steps_array):
            if array.shape[0] != rows:
                array.resize((rows, *array.shape[1:]))


