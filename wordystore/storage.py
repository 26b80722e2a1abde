"""Where a trajectory lives: a zarr store, opened from a path, a URL or a ready store; and the
single-writer lock."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from zarr.abc.store import Store
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

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def clear_store(store: Store) -> None:
    """Delete every key of the store but the writer lock (which the caller holds)."""
    from zarr.core.sync import collect_aiterator, sync

    for key in collect_aiterator(store.list()):  # already synchronous: it runs the iterator itself
        if key != LOCK_FILE:
            sync(store.delete(key))


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
