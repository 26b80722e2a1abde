"""The store's JSON documents, read and written over :mod:`wordystore.store.storage`: the metadata (in the
root ``zarr.json``), the commit record, each array's and group's ``zarr.json``, the writer lease of
a store on object storage, and any other JSON key (``verified.json``, the analysis cache). The
documents' contents are :mod:`wordystore.format`'s; this module only moves them, naming the key of a
document that does not parse. No document is read past ``MAX_DOCUMENT_BYTES``.
"""

from __future__ import annotations

import json

from wordystore.errors import FormatError
from wordystore.format.codecs import ShardBinding
from wordystore.format.keys import (
    COMMIT_KEY,
    GROUP_JSON,
    MAX_DOCUMENT_BYTES,
    MAX_ROWS,
    WRITER_LOCK_KEY,
    document_key,
    token_set_path,
    vocab_size,
)
from wordystore.format.layout import ArrayLayout, is_token_set_layout
from wordystore.format.metadata import Metadata
from wordystore.format.records import CommitRecord, LeaseRecord
from wordystore.store import storage


def dumps(document: dict) -> bytes:
    return json.dumps(document, indent=1, allow_nan=False).encode()


def loads(data: bytes, key: str):
    """Parse a JSON document; a damaged one is a FormatError naming its key."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # ValueError: JSON's, and huge integers
        raise FormatError(f"{key} is not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None


def read_json(store, key: str):
    """A JSON document of the store; None when the key is absent."""
    data = storage.get(store, key, limit=MAX_DOCUMENT_BYTES)
    return None if data is None else loads(data, f"{storage.describe(store)}/{key}")


def write_json(store, key: str, document: dict, durable: bool = False) -> None:
    storage.put(store, key, dumps(document))
    if durable:
        storage.sync_to_disk(store, [key])


def write_group(store, path: str, durable: bool = False) -> None:
    """A plain group's ``zarr.json`` at ``path`` (``hot``, ``token_sets``)."""
    write_json(store, document_key(path), GROUP_JSON, durable)


def read_metadata(store) -> Metadata:
    where = storage.describe(store)
    try:
        root = read_json(store, document_key(""))
    except FileNotFoundError:  # a read-only local store whose directory does not exist
        root = None
    if root is None:
        directory = storage.local_root(store)
        why = "no such directory" if directory is not None and not directory.exists() else "it has no zarr.json"
        raise FileNotFoundError(f"no trajectory at {where}: {why}")
    return Metadata.from_root_json(root, where)


def write_metadata(store, meta: Metadata, durable: bool = False) -> None:
    write_json(store, document_key(""), meta.to_root_json(), durable)


def read_commit(store) -> CommitRecord:
    where = storage.describe(store)
    try:
        return _commit_record(read_json(store, COMMIT_KEY), where)
    except FormatError as exc:  # every damaged record: say how to rebuild it
        raise FormatError(
            f"{exc}; `wordystore verify {where} --repair` rebuilds it from the rows that verify"
        ) from None


def read_commit_version(store) -> tuple[CommitRecord, str]:
    """On object storage: the commit record and its version (etag), which a writer taking the store
    over rewrites on that version only."""
    where = storage.describe(store)
    try:
        found = storage.get_versioned(store, COMMIT_KEY, MAX_DOCUMENT_BYTES)
        return _commit_record(None if found is None else loads(found[0], f"{where}/{COMMIT_KEY}"), where), found[1]
    except FormatError as exc:
        raise FormatError(
            f"{exc}; `wordystore verify {where} --repair` rebuilds it from the rows that verify"
        ) from None


def _commit_record(doc, where: str) -> CommitRecord:
    if doc is None:
        raise FormatError(f"{where} has no {COMMIT_KEY}: it was never completely created, or the record was lost")
    return CommitRecord.from_json(doc, where)


def write_commit(store, record: CommitRecord, durable: bool = False) -> None:
    write_json(store, COMMIT_KEY, record.to_json(), durable)


def read_lease(store) -> tuple[LeaseRecord | None, str | None]:
    """On object storage: the writer lease and its version (etag); (None, None) if there is none."""
    found = storage.get_versioned(store, WRITER_LOCK_KEY, MAX_DOCUMENT_BYTES)
    if found is None:
        return None, None
    where = storage.describe(store)
    return LeaseRecord.from_json(loads(found[0], f"{where}/{WRITER_LOCK_KEY}"), where), found[1]


def write_lease(store, lease: LeaseRecord, version: str | None) -> str:
    """Put the writer lease only if there is none (``version`` None) or it is still at ``version``;
    returns the new version. Refused: :class:`wordystore.store.objectstore.ConditionFailed`."""
    return storage.put_if(store, WRITER_LOCK_KEY, dumps(lease.to_json()), version)


def read_layout(store, path: str, binding: ShardBinding | None = None) -> ArrayLayout:
    """The layout in the ``zarr.json`` of the array at ``path``, its shards bound by ``binding``."""
    doc = read_json(store, document_key(path))
    if doc is None:
        raise FormatError(f"{storage.describe(store)}: array '{path}' is missing (no {path}/zarr.json)")
    return ArrayLayout.from_zarr_json(path, doc, binding)


def read_layouts(store, meta: Metadata) -> dict[str, tuple[ArrayLayout, ArrayLayout]]:
    """The (main, hot) layouts of every per-row array the metadata names, where it puts them."""
    return {
        name: tuple(read_layout(store, expected.path, meta.binding) for expected in meta.layouts(name))
        for name in meta.arrays()
    }


def read_token_set_layout(store, meta: Metadata, name: str) -> ArrayLayout:
    """The layout of token set ``name`` (one the metadata lists), refused unless it is exactly a
    token set's of at most as many ids as the token axis is long."""
    if name not in meta.token_sets:
        raise KeyError(f"no token set {name!r}; this trajectory has {list(meta.token_sets)}")
    layout = read_layout(store, token_set_path(name), meta.binding)
    vocab = vocab_size(meta.kinds)
    if not is_token_set_layout(layout, name) or layout.shape[0] > (MAX_ROWS if vocab is None else vocab):
        raise FormatError(
            f"{storage.describe(store)}: array '{layout.path}': its zarr.json is not a token set's "
            f"(at most {vocab or MAX_ROWS} int64 ids on one axis, in chunks of min(size, 65536), blosc "
            "and crc32c)"
        )
    return layout


def write_layout(store, layout: ArrayLayout, durable: bool = False) -> None:
    write_json(store, document_key(layout.path), layout.to_zarr_json(), durable)
