"""Where a trajectory lives: a zarr store, opened from a path, a URL or a ready store; bytes in and
out of it; and the single-writer lock.

Everything goes through zarr's ``Store`` API (synchronous shortcuts where the store has them), so
the same code serves a local directory today and object storage later.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from zarr.abc.store import RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from wordystore.errors import StoreLockedError

LOCK_FILE = ".wordystore-writer.lock"


def as_store(where: str | os.PathLike | Store, read_only: bool) -> Store:
    """A zarr store for a local path, an fsspec URL (``s3://...``), or a store given as is."""
    if isinstance(where, Store):
        return where
    text = os.fspath(where)
    if "://" in text and not text.startswith("file://"):
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(text, read_only=read_only)
    return LocalStore(text.removeprefix("file://"), read_only=read_only)


def local_root(store: Store) -> Path | None:
    """The directory of a local store, None for other stores."""
    return Path(store.root) if isinstance(store, LocalStore) else None


def describe(store: Store) -> str:
    root = local_root(store)
    return str(root) if root is not None else repr(store)


def get(store: Store, key: str, suffix: int | None = None, byte_range: tuple[int, int] | None = None) -> bytes | None:
    """The value of ``key`` (or its last ``suffix`` bytes, or bytes ``[start, end)``); None if absent."""
    view = get_view(store, key, suffix, byte_range)
    return None if view is None else view.tobytes()


def get_view(store: Store, key: str, suffix: int | None = None,
             byte_range: tuple[int, int] | None = None) -> memoryview | None:
    """As :func:`get`, a read-only view of the bytes read instead of a copy (copying a shard into
    a ``bytes`` would hold the GIL for every byte)."""
    request = SuffixByteRequest(suffix) if suffix is not None else None
    if byte_range is not None:
        request = RangeByteRequest(*byte_range)
    prototype = default_buffer_prototype()
    if isinstance(store, LocalStore):
        buffer = store.get_sync(key, prototype=prototype, byte_range=request)
    else:
        buffer = sync(store.get(key, prototype=prototype, byte_range=request))
    return None if buffer is None else memoryview(buffer.as_numpy_array())


def get_ranges(store: Store, key: str, ranges: list[tuple[int, int]]) -> list[bytes]:
    """Several byte ranges ``[start, end)`` of one key."""
    values = [get(store, key, byte_range=r) for r in ranges]
    if any(v is None for v in values):
        raise FileNotFoundError(f"{key} disappeared from {describe(store)} while being read")
    return values


def put(store: Store, key: str, data: bytes) -> None:
    """Replace ``key`` atomically (LocalStore writes a temporary file and renames it; object
    stores replace objects whole)."""
    buffer = default_buffer_prototype().buffer.from_bytes(data)
    if isinstance(store, LocalStore):
        store.set_sync(key, buffer)
    else:
        sync(store.set(key, buffer))


def delete(store: Store, key: str) -> None:
    """Delete ``key`` (absent is fine); local stores also drop the directories it leaves empty."""
    if isinstance(store, LocalStore):
        store.delete_sync(key)
        parent = (store.root / key).parent
        while parent != store.root:
            try:
                if any(parent.iterdir()):
                    break
                parent.rmdir()
            except OSError:  # removed by another delete, or filled by a put, meanwhile: theirs now
                break
            parent = parent.parent
    else:
        sync(store.delete(key))


def exists(store: Store, key: str) -> bool:
    return sync(store.exists(key))


def list_prefix(store: Store, prefix: str) -> list[str]:
    """Every key under ``prefix`` (a directory-like prefix such as ``"embeddings/"``)."""
    root = local_root(store)
    if root is not None:  # zarr's rglob fails when a running writer removes a compacted directory
        return [os.path.relpath(os.path.join(folder, name), root)
                for folder, _, names in os.walk(root / prefix) for name in names]  # os.walk skips vanished ones

    async def collect():
        return [key async for key in store.list_prefix(prefix)]

    return sync(collect())


def size(store: Store, prefix: str = "") -> int:
    """Bytes of every key under ``prefix``; a key that vanishes meanwhile (a writer compacting)
    counts 0."""
    root, total = local_root(store), 0
    for key in list_prefix(store, prefix):
        try:
            total += os.path.getsize(root / key) if root is not None else sync(store.getsize(key))
        except FileNotFoundError:
            pass
    return total


def sync_to_disk(store: Store, keys: list[str]) -> None:
    """fsync the files of ``keys`` (local stores; object stores are durable once a put returns)."""
    root = local_root(store)
    if root is None:
        return
    for key in keys:
        fd = os.open(root / key, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class WriterLock:
    """An exclusive ``flock`` on a file in the store's directory, held while a writer is open.

    The kernel drops it when the process dies, so a killed writer never leaves a stale lock.
    Stores that are not local directories are not locked (documented in docs/format.md).
    """

    def __init__(self, store: Store):
        self._fd = None
        root = local_root(store)
        if root is None:
            return
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreLockedError(
                f"{root} is open for writing by another writer (pid {holder}); "
                "one writer at a time: close it first, or open the store read-only with trajectory.open"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def fileno(self) -> int | None:
        """The locked file's descriptor (a child process that shares the lock inherits it)."""
        return self._fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __del__(self):  # a writer dropped without close() must not keep the store locked
        self.release()


def clear_store(store: Store) -> None:
    """Delete every key of the store but the writer lock (which the caller holds)."""
    for key in list_prefix(store, ""):
        if key != LOCK_FILE:
            delete(store, key)
