"""Encoding rows into shards: a hot block as the writer writes it, and the main tier's long chunks
that compaction (and ``bulk_append``) writes.

Each shard is encoded on its own from its rows' data: :func:`encode_hot_shard` and
:func:`encode_main_shard` are pure, and :func:`write_main_rows` runs one task per main shard on
the pool it is given, so that any of them can fan out over more workers. What a shard holds is
the layout's (:class:`wordystore.format.layout.ArrayLayout`); when the commit record may move forward is
the writer's (:mod:`wordystore.write.writer`, docs/format.md "Commit protocol").
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from wordystore.format.keys import document_key
from wordystore.format.kinds import Kind
from wordystore.format.layout import ArrayLayout
from wordystore.store import json_documents, storage

# ``read_tile(name, fetch, out)`` fills ``out`` with the orthogonal selection ``fetch`` of array ``name``.
TileReader = Callable[[str, tuple, np.ndarray], None]


def block_shards(layout: ArrayLayout, first_row: int) -> list[tuple[int, ...]]:
    """The coordinates of the hot shards of the block that starts at row ``first_row``."""
    return [(first_row // layout.shard[0], *rest) for rest in np.ndindex(*layout.shard_grid()[1:])]


def encode_hot_shard(layout: ArrayLayout, coords: tuple[int, ...], runs: list[np.ndarray]) -> np.ndarray:
    """Hot shard ``coords``'s bytes from its block's rows (``runs``: every row of the block, whole,
    as consecutive runs of rows)."""
    region = (slice(None), *layout.shard_region(coords)[1:])
    parts = [run[region] for run in runs]
    return layout.encode_shard(coords, parts[0] if len(parts) == 1 else np.concatenate(parts))


def write_hot_shard(store, layout: ArrayLayout, coords: tuple[int, ...], runs: list[np.ndarray], durable: bool) -> str:
    """Encode and store one hot shard (fsynced if ``durable``); returns its key. A block's shards are
    written in parallel, one task each."""
    key = layout.shard_key(coords)
    storage.put(store, key, encode_hot_shard(layout, coords, runs))
    if durable:
        storage.sync_to_disk(store, [key])
    return key


def encode_main_shard(
    layout: ArrayLayout, coords: tuple[int, ...], data: np.ndarray, inputs: list[np.ndarray] | None = None
) -> np.ndarray:
    """Main shard ``coords``'s bytes from its region's rows (from a chunk's first row). A predicted
    kind is stored as residuals, counted from that first row, against the same rows of its
    prediction's ``inputs`` (the gradients and norms of a moment, the moments of a parameter...),
    computed over ``data``, which the caller gives up."""
    prediction = layout.prediction
    if prediction is not None:
        data = prediction.residuals(data, inputs, in_place=True)
    return layout.encode_shard(coords, data)


def hot_shards_compacted(hot: ArrayLayout, start: int, stop: int) -> list[str]:
    """The keys of the hot shards made redundant by compacting rows ``[start, stop)``: every block
    holding one of them (its other rows are compacted too, or not committed)."""
    return [hot.shard_key(coords) for coords, _, _ in hot.shards_holding(start, stop)]


def write_main_rows(
    store,
    layouts: dict[str, ArrayLayout],
    arrays: dict[str, Kind],
    read_tile: TileReader,
    start: int,
    stop: int,
    pool,
    durable: bool,
) -> dict[str, ArrayLayout]:
    """Encode rows ``[start, stop)`` (one chunk of rows, ``start`` on a chunk boundary) of every
    array into main-tier shards, one shard per task on ``pool``; ``read_tile`` gives the rows' data.
    Returns the layouts grown to ``stop`` rows (their ``zarr.json`` written; the caller commits)."""
    jobs, grown = [], {}
    for name in arrays:
        layout = layouts[name].with_rows(max(stop, layouts[name].shape[0]))
        grown[name] = layout
        for coords in np.ndindex(*layout.shard_grid()[1:]):
            jobs.append(
                pool.submit(
                    _write_main_shard, store, layout, arrays, read_tile, name, (start // layout.shard[0], *coords), stop
                )
            )
    keys = [job.result() for job in jobs]
    for layout in grown.values():
        json_documents.write_layout(store, layout)
        keys.append(document_key(layout.path))
    if durable:
        storage.sync_to_disk(store, keys)
    return grown


def _write_main_shard(
    store,
    layout: ArrayLayout,
    arrays: dict[str, Kind],
    read_tile: TileReader,
    name: str,
    coords: tuple[int, ...],
    stop: int,
) -> str:
    """Read one main shard's rows (up to ``stop``), encode and store them; returns its key. A
    predicted kind's inputs are read for the same rows (and tokens, when they have them)."""
    region = layout.shard_region(coords)
    fetch = (slice(region[0].start, stop, 1), *(slice(r.start, r.stop, 1) for r in region[1:]))
    data = np.zeros((stop - region[0].start, *(r.stop - r.start for r in region[1:])), arrays[name].numpy_dtype)
    read_tile(name, fetch, data)
    inputs = []
    for source in layout.prediction.inputs if layout.prediction is not None else ():
        kind = arrays[source]
        inputs.append(np.empty(data.shape if kind.shape else data.shape[:1], kind.numpy_dtype))
        read_tile(source, fetch if kind.shape else fetch[:1], inputs[-1])
    key = layout.shard_key(coords)
    storage.put(store, key, encode_main_shard(layout, coords, data, inputs))
    return key
