"""A store's life before and around its writer: :func:`create` a trajectory, :func:`resume` one, or
build a whole one aside and put it in place when complete (:func:`create_whole`, for ``convert``,
``import`` and ``stitch``). Each hands back a :class:`wordystore.write.writer.TrajectoryWriter` holding
the store's writer lock (:func:`wordystore.store.lease.writer_lock`: a directory's ``flock``, or on object
storage a lease that fences the store's writes).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import secrets
import shutil
from collections.abc import Mapping
from importlib import metadata as importlib_metadata

from wordystore.errors import ReadOnlyError
from wordystore.format.keys import (
    COMMIT_KEY,
    HOT_GROUP,
    TOKEN_SETS_GROUP,
    check_config,
    document_key,
    is_chunk_key,
    vocab_size,
)
from wordystore.format.kinds import Kind
from wordystore.format.layout import BLOCK_ROWS, CHUNK_ROWS, Profile, check_kinds, check_predictions, check_rows
from wordystore.format.metadata import Metadata
from wordystore.format.prediction import Prediction
from wordystore.format.records import CommitRecord
from wordystore.pools import WriterPools
from wordystore.store import json_documents, storage
from wordystore.store.lease import writer_lock
from wordystore.store.storage import WriterLock, as_store, describe, local_root
from wordystore.write.writer import TrajectoryWriter, check_token_set, write_token_set


def library_versions() -> dict[str, str]:
    names = ("wordystore", "zarr", "numcodecs", "pcodec", "numpy", "torch", "transformers", "safetensors", "ml_dtypes")
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
    profile: str = "compact",
    overwrite: bool = False,
    durable: bool = True,
    keep_states: int = 1,
    block_rows: int = BLOCK_ROWS,
    chunk_rows: int = CHUNK_ROWS,
    predictions: Mapping[str, Prediction] | None = None,
    storage_options: dict | None = None,
    write_threads: int | None = None,
    compaction_threads: int | None = None,
    writer_process: bool | None = None,
) -> TrajectoryWriter:
    """Create a trajectory at ``where`` and open it for appending.

    Everything is checked before anything is written; a create that fails leaves nothing behind.
    The writer holds the store's lock until it is closed (a ``with`` block closes it).

    Parameters
    ----------
    where : str, os.PathLike or zarr store
        A directory path, an ``s3://``, ``gs://``, ``az://`` or ``file://`` URL, or a zarr store.
    kinds : mapping of str to Kind
        Each tensor kind's name and its per-step :class:`Kind` (shape, dtype, dimension names);
        :func:`wordystore.seed_kinds` gives the seed notebook's.
    token_sets : mapping of str to array-like, optional
        Named sets of token ids (``trained``, ``untrained``), usable as an index when reading.
    config : mapping, optional
        Any JSON-serialisable dict: the run's full config.
    profile : {"compact", "portable", "archive"}
        ``compact`` (pcodec, the smallest that reads fast), ``portable`` (standard zarr codecs, for
        tensorstore) or ``archive`` (compact, with the parameter predicted from its moments too: the
        smallest, reading it several times slower; needs :func:`wordystore.archive_predictions`).
    overwrite : bool
        Replace a trajectory already at ``where`` (default: refuse).
    durable : bool
        fsync data before each commit record on local stores.
    keep_states : int
        How many resume states to keep (``set_state_provider``).
    block_rows, chunk_rows : int
        Rows the writer holds in memory; rows per chunk of the main tier (longer compresses better,
        shorter makes one-row reads cheaper; docs/format.md).
    predictions : mapping of str to Prediction, optional
        E.g. :func:`wordystore.adam_predictions`: Adam's moments stored as residuals against a
        replay of the optimizer, several times smaller, still bit for bit (docs/format.md,
        "Predicted kinds").
    storage_options : dict, optional
        A URL's endpoint, region and credentials (default: from the environment;
        :func:`wordystore.store.objectstore.open_url`).
    write_threads, compaction_threads : int, optional
        The writer's pools (default: from the machine and ``WORDYSTORE_WRITE_THREADS``,
        ``WORDYSTORE_COMPACTION_THREADS``; ``compaction_threads=0`` compacts only at close).
    writer_process : bool, optional
        Run the pools in a child process (default: with a GPU, or rows of at least 8 MiB, wherever one
        can run: a local store with room in /dev/shm; or ``WORDYSTORE_WRITER_PROCESS``;
        :class:`wordystore.WriterPools`). The choice is recorded with every
        commit (``commit.json``'s ``writer``; ``wordystore info`` shows it).

    Returns
    -------
    TrajectoryWriter
        Open for :meth:`~wordystore.TrajectoryWriter.append`; readers see rows as blocks commit.

    Examples
    --------
    >>> import torch, wordystore
    >>> kinds = wordystore.seed_kinds(vocab_size=300, hidden_dim=8)
    >>> sets = {"trained": range(200), "untrained": range(200, 300)}
    >>> with wordystore.create("runs/tiny.zarr", kinds, token_sets=sets, config={"lr": 1e-3}) as w:
    ...     for step in range(3):
    ...         w.append(step, **{name: torch.zeros(k.shape, dtype=k.torch_dtype) for name, k in kinds.items()})
    >>> wordystore.open("runs/tiny.zarr").steps
    array([0, 1, 2])
    """
    if not kinds:
        raise ValueError("create() needs at least one kind, e.g. wordystore.seed_kinds(vocab_size, hidden_dim)")
    kinds = dict(kinds)
    check_kinds(kinds)
    Profile(profile)
    check_rows(block_rows, chunk_rows)
    predictions = dict(predictions or {})
    check_predictions(predictions, kinds, profile)
    vocab = vocab_size(kinds)
    sets = {name: check_token_set(name, ids, vocab) for name, ids in (token_sets or {}).items()}
    row_bytes = sum(kind.step_nbytes for kind in kinds.values())
    pools = WriterPools.for_machine(write_threads, compaction_threads, writer_process, row_bytes=row_bytes)
    config = dict(config or {})
    check_config(config)
    if not isinstance(keep_states, int) or keep_states < 1:
        raise ValueError(f"keep_states must be a positive int, got {keep_states!r}")

    store = as_store(where, read_only=False, storage_options=storage_options)
    if store.read_only:
        raise ReadOnlyError(f"cannot create a trajectory in {describe(store)}: the store is read-only")
    _refuse_existing(store, overwrite)  # before the lock, whose file would change the store
    root = local_root(store)
    made_dir = root is not None and not root.exists()
    lock = writer_lock(store)
    try:
        _refuse_existing(store, overwrite)  # again, now that no other writer can be making it
    except BaseException:
        lock.release()
        raise
    try:
        storage.clear_store(store)
        meta = Metadata(
            kinds=kinds,
            profile=profile,
            token_sets=tuple(sorted(sets)),
            config=config,
            versions=library_versions(),
            created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            block_rows=block_rows,
            chunk_rows=chunk_rows,
            predictions=predictions,
            store_id=secrets.token_hex(16),
        )
        json_documents.write_group(store, HOT_GROUP)
        for name in meta.arrays():
            for layout in meta.layouts(name):
                json_documents.write_layout(store, layout)
        if sets:
            json_documents.write_group(store, TOKEN_SETS_GROUP)
        for name, ids in sets.items():
            write_token_set(store, meta, name, ids)
        json_documents.write_metadata(store, meta)
        record = CommitRecord(writer_generation=lock.generation, writer=pools.to_dict())
        json_documents.write_commit(store, record, durable=durable)  # last: the store is complete
        return TrajectoryWriter(store, lock, durable, keep_states, pools)
    except BaseException:  # remove what this call wrote (the refusals above have written nothing)
        try:
            storage.clear_store(store)
        finally:
            lock.release()
            if made_dir:
                shutil.rmtree(root, ignore_errors=True)
        raise


def resume(
    where,
    *,
    durable: bool = True,
    keep_states: int = 1,
    storage_options: dict | None = None,
    write_threads: int | None = None,
    compaction_threads: int | None = None,
    writer_process: bool | None = None,
) -> TrajectoryWriter:
    """Open an existing trajectory to append after its last committed row.

    Rows a writer had not committed when it died are ignored (and overwritten), and the temporary
    files it left are removed; committed rows are never touched. A store whose commit record is
    missing or damaged is refused: see ``wordystore verify --repair``. On object storage, the lease of
    a writer that was killed is waited out (a warning says so; up to 32 s by default), and a live
    writer's refuses this one.

    Parameters
    ----------
    where : str, os.PathLike or zarr store
        The trajectory, as :func:`create` takes it.
    durable, keep_states, storage_options, write_threads, compaction_threads, writer_process
        As for :func:`create`; the pools are sized as it sizes them.

    Returns
    -------
    TrajectoryWriter
        Open for appending steps after the last committed one; kinds, token sets, config and
        profile are the store's.

    Examples
    --------
    >>> import torch, wordystore
    >>> with wordystore.resume("runs/tiny.zarr") as w:  # the store create's example made
    ...     w.append(3, **{name: torch.zeros(k.shape, dtype=k.torch_dtype) for name, k in w.kinds.items()})
    >>> wordystore.open("runs/tiny.zarr").steps
    array([0, 1, 2, 3])
    """
    store = as_store(where, read_only=False, storage_options=storage_options)
    if store.read_only:
        raise ReadOnlyError(f"cannot append to {describe(store)}: the store is read-only")
    if not storage.exists(store, document_key("")):  # before the lock, which would make the directory
        raise FileNotFoundError(f"no trajectory at {describe(store)} to resume; wordystore.create() makes one")
    row_bytes = sum(kind.step_nbytes for kind in json_documents.read_metadata(store).kinds.values())
    pools = WriterPools.for_machine(write_threads, compaction_threads, writer_process, row_bytes=row_bytes)
    lock = writer_lock(store)
    try:
        for key in storage.temporary_keys(store):  # a killed writer's, which nothing else would remove
            storage.delete(store, key)
        return TrajectoryWriter(store, lock, durable, keep_states, pools)
    except BaseException:
        lock.release()
        raise


@contextlib.contextmanager
def create_whole(where, kinds: Mapping[str, Kind], *, overwrite: bool = False, **create_args):
    """``create`` for commands that write a whole store at once (convert, import, stitch): a local
    store is built under a temporary name beside ``where`` and renamed into place, so it appears
    only once complete, a failed build leaves nothing behind, and an existing store (with
    ``overwrite``) stays intact until its replacement is whole. Object storage has no renames: the
    store is built in place under the writer's lease, a chunk of rows committed at a time (readers
    see a prefix of it meanwhile, as of a recording run), an existing one (with ``overwrite``)
    replaced from the start, and a failed build deleted.

    >>> with create_whole("out.zarr", kinds, config=cfg) as w:
    ...     w.bulk_append(steps, read_tile)
    """
    final = as_store(where, read_only=False)
    _refuse_existing(final, overwrite)
    root = local_root(final)
    target = where if root is None else root.with_name(f".{root.name}.{os.getpid()}.partial")
    writer = create(target, kinds, overwrite=True, writer_process=False, **create_args)  # bulk_append: in this process
    try:
        yield writer
        writer.close()
    except BaseException:
        writer.abandon()
        if root is not None:
            shutil.rmtree(target, ignore_errors=True)
        raise
    if root is not None:
        _swap_into_place(target, root, overwrite)


def _refuse_existing(store, overwrite: bool) -> None:
    if storage.exists(store, document_key("")) and not (overwrite or _abandoned(store)):
        raise FileExistsError(
            f"{describe(store)} already holds a zarr store; pass overwrite=True (--overwrite) to replace it"
        )


def _abandoned(store) -> bool:
    """A create that was killed before its commit record: metadata and token sets (which create
    writes), maybe, but never a row."""
    return not storage.exists(store, COMMIT_KEY) and not any(
        is_chunk_key(key) and not key.startswith(f"{TOKEN_SETS_GROUP}/") for key in storage.list_prefix(store, "")
    )


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
