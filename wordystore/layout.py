"""The on-disk layout of a trajectory: metadata, array encodings, and the commit record.

``docs/format.md`` is the specification; this module is its one implementation. Everything is
read and written through a zarr ``Store`` (local directory today, object storage later), and every
document is JSON: opening a store never executes code.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import zarr
from zarr.abc.store import Store
from zarr.codecs import BloscCodec, Crc32cCodec, TransposeCodec
from zarr.core.buffer import default_buffer_prototype

from wordystore.errors import FormatError
from wordystore.kinds import Kind

FORMAT_NAME = "wordystore.trajectory"
FORMAT_VERSION = 1
ATTRS_KEY = "wordystore"  # root group attribute holding the metadata document
COMMIT_KEY = "commit.json"  # the commit record, a JSON object at the store's root
STEPS_ARRAY = "recorded_steps"
TOKEN_SETS_GROUP = "token_sets"

# Chosen by measurement (docs/format.md, "Chunking and codecs"): 8 steps per chunk, the step axis
# made fastest-varying inside each chunk, blosc zstd level 1 with a byte or bit shuffle, crc32c.
STEPS_PER_CHUNK = 8
CHUNK_BYTES = 256 * 1024  # target raw size of one inner chunk
SHARD_BYTES = 1024 * 1024  # minimum raw size of a shard of small kinds (scalars): fewer, larger files
MAX_STEPS_PER_SHARD = 4096
BITSHUFFLE_KINDS = frozenset({"grads", "momentum"})  # measured: bit shuffle wins on these, byte shuffle elsewhere


@dataclass(frozen=True)
class Encoding:
    """How one kind's array is cut and compressed."""

    shards: tuple[int, ...]
    chunks: tuple[int, ...]
    transpose: tuple[int, ...] | None
    shuffle: str

    def create_array(self, group: zarr.Group, name: str, kind: Kind) -> zarr.Array:
        return group.create_array(
            name,
            shape=(0, *kind.shape),
            dtype=kind.numpy_dtype,
            chunks=self.chunks,
            shards=self.shards,
            filters=[TransposeCodec(order=self.transpose)] if self.transpose else (),
            compressors=[
                BloscCodec(cname="zstd", clevel=1, shuffle=self.shuffle, typesize=kind.numpy_dtype.itemsize),
                Crc32cCodec(),
            ],
            fill_value=0,
            dimension_names=("step", *kind.dims),
            config={"write_empty_chunks": True},
        )


def encoding_for(name: str, kind: Kind, steps_per_chunk: int = STEPS_PER_CHUNK) -> Encoding:
    """Shards hold ``steps_per_chunk`` whole steps (or, for small kinds, a multiple of it), so the
    writer writes whole shards; inner chunks split the first per-step axis (tokens) into pieces of
    about ``CHUNK_BYTES`` so one token's history reads little."""
    ndim = len(kind.shape)
    step_bytes = max(kind.step_nbytes, 1)
    blocks_per_shard = max(1, min(MAX_STEPS_PER_SHARD // steps_per_chunk, SHARD_BYTES // (steps_per_chunk * step_bytes)))
    shard_steps = steps_per_chunk * blocks_per_shard
    if ndim == 0:
        return Encoding((shard_steps,), (shard_steps,), None, "shuffle")
    row_bytes = step_bytes // max(kind.shape[0], 1)  # one token's bytes in one step
    rows = max(1, min(kind.shape[0], CHUNK_BYTES // max(steps_per_chunk * row_bytes, 1)))
    chunks = tuple(max(1, n) for n in (shard_steps, rows, *kind.shape[1:]))
    # A shard spans all tokens, rounded up to whole chunks (zarr wants shards made of whole chunks).
    shards = (shard_steps, math.ceil(max(kind.shape[0], 1) / rows) * rows, *chunks[2:])
    transpose = (*range(1, ndim + 1), 0)  # step axis last: consecutive steps sit side by side
    return Encoding(shards, chunks, transpose, "bitshuffle" if name in BITSHUFFLE_KINDS else "shuffle")


def read_json(store: Store, key: str) -> dict | None:
    buf = zarr.core.sync.sync(store.get(key, prototype=default_buffer_prototype()))
    return None if buf is None else json.loads(buf.to_bytes())


def write_json(store: Store, key: str, document: dict) -> None:
    """Write one JSON document; zarr's LocalStore and object stores replace a key atomically."""
    data = default_buffer_prototype().buffer.from_bytes(json.dumps(document, indent=1).encode())
    zarr.core.sync.sync(store.set(key, data))


def read_committed_steps(store: Store) -> int:
    """How many leading rows of every array are committed (the commit record; 0 if none yet)."""
    record = read_json(store, COMMIT_KEY)
    if record is None:
        return 0
    if record.get("format") != FORMAT_NAME or not isinstance(record.get("committed_steps"), int):
        raise FormatError(f"{COMMIT_KEY} is not a wordystore commit record: {record!r}")
    return record["committed_steps"]


def write_commit(store: Store, committed_steps: int, last_step: int | None) -> None:
    write_json(store, COMMIT_KEY, {"format": FORMAT_NAME, "committed_steps": committed_steps, "last_step": last_step})


def read_metadata(group: zarr.Group, where: str) -> dict:
    """The root group's metadata document, checked for format name and version."""
    meta = group.attrs.get(ATTRS_KEY)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise FormatError(f"{where} is a zarr group but not a wordystore trajectory (no '{ATTRS_KEY}' attributes)")
    if meta.get("format_version", math.inf) > FORMAT_VERSION:
        raise FormatError(
            f"{where} has format version {meta.get('format_version')}; this wordystore reads up to {FORMAT_VERSION}"
        )
    return meta
