"""Where a trajectory lives: a zarr store, opened from a path, a URL or a ready store; bytes in and
out of it; and the single-writer lock of a directory.

Everything goes through zarr's ``Store`` API, with synchronous shortcuts where the store has them:
a local directory (:class:`GuardedLocalStore`) and object storage (``s3://``, ``gs://``, ``az://``:
:class:`wordystore.store.objectstore.ObjectUrlStore`, whose writes a writer's lease fences; the lease is
:mod:`wordystore.store.lease`).

A store may come from someone else, so nothing here leaves it (docs/security.md): every key is
checked to be a relative path inside the store (no ``..``, no absolute path, no empty part) on
every backend, and a local store is a :class:`GuardedLocalStore`, which also follows no symbolic
link inside the store, reads only regular files (a FIFO or a device is refused, never opened for
long) and reads no more bytes than the caller's ``limit``. zarr-python reading such a store (format
1's convert, a plain reader handed the store) goes through the same checks.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from zarr.abc.store import OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from wordystore.errors import FormatError, StoreLockedError
from wordystore.format.keys import WRITER_LOCK_KEY, ZARR_JSON, is_temporary_key
from wordystore.store.objectstore import ObjectUrlStore, open_url

MAX_READ_BYTES = 2**36  # what a read given no limit of its own may take: far more than any key of a store


def check_key(key: str) -> str:
    """``key`` if it names something inside a store: a relative path of non-empty parts, none ``.``
    or ``..``; else FormatError (a document naming it is damaged or hostile)."""
    if (
        not isinstance(key, str)
        or not key
        or key.startswith("/")
        or "\\" in key
        or "\0" in key
        or any(part in ("", ".", "..") for part in key.split("/"))
    ):
        raise FormatError(
            f"key {key!r} does not name anything inside a store: keys are relative paths without "
            "'.', '..', empty parts or backslashes"
        )
    return key


def _no_links(root: Path, parts: list[str]) -> str:
    """``root`` joined with ``parts``, refusing a symbolic link at any of them (which could lead out
    of the store); parts that do not exist yet are fine (a write makes real directories). A string:
    the read path checks a path per shard it opens, and pathlib's objects cost more than the checks."""
    path = os.fspath(root)
    for part in parts:
        path = os.path.join(path, part)
        try:
            mode = os.lstat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return os.path.join(os.fspath(root), *parts)
        if stat.S_ISLNK(mode):
            raise FormatError(
                f"{path} is a symbolic link; wordystore follows none inside a store (it could lead outside it)"
            )
    return path


def _file_path(root: Path, key: str) -> str:
    """The file of ``key`` in the local store at ``root``, reached through no symbolic link."""
    parts = check_key(key).split("/")
    return os.path.join(_no_links(root, parts[:-1]), parts[-1])


def local_path(root: Path, key: str) -> Path:
    """:func:`_file_path` as a ``Path``."""
    return Path(_file_path(root, key))


def _byte_span(request, size: int) -> tuple[int, int]:
    if request is None:
        return 0, size
    if isinstance(request, RangeByteRequest):
        return min(request.start, size), min(request.end, size)
    if isinstance(request, SuffixByteRequest):
        return max(0, size - request.suffix), size
    if isinstance(request, OffsetByteRequest):
        return min(request.offset, size), size
    raise TypeError(f"unexpected byte range {request!r}")


def _open_regular(path: Path) -> int | None:
    """A read-only descriptor of the regular file at ``path`` (None if absent or a directory); a
    symbolic link, FIFO, device or socket is refused without blocking."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FormatError(
                f"{path} is a symbolic link; wordystore reads only regular files inside a store "
                "(a link could lead outside it)"
            ) from None
        raise
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        return fd
    os.close(fd)
    if stat.S_ISDIR(mode):
        return None
    raise FormatError(f"{path} is not a regular file (a FIFO, device or socket); wordystore reads only regular files")


def read_local(root: Path, key: str, requests: list, limit: int | None = None) -> list[bytes] | None:
    """The bytes of each request (None: the whole file) of ``key`` in the local store at ``root``,
    each at most ``limit`` bytes; None if the key is absent."""
    return read_local_then(root, key, requests, lambda parts: [], limit)


def read_local_then(
    root: Path, key: str, requests: list, then: Callable[[list[bytes]], list[tuple[int, int]]], limit=None
) -> list[bytes] | None:
    """:func:`read_local`'s bytes, followed by those of the ranges ``[start, end)`` that ``then``
    names from them (a shard's index, then the chunks it lists), read from the file opened once."""
    fd = _open_regular(_file_path(root, key))
    if fd is None:
        return None
    try:
        size = os.fstat(fd).st_size
        first = _read_requests(fd, size, requests, limit, root, key)
        return first + _read_requests(fd, size, [RangeByteRequest(*r) for r in then(first)], limit, root, key)
    finally:
        os.close(fd)


def _read_requests(fd: int, size: int, requests: list, limit: int | None, root: Path, key: str) -> list[bytes]:
    """The bytes of each request of the open file ``fd`` (``key`` of the store at ``root``) of
    ``size`` bytes (clipped to them), each at most ``limit``."""
    spans = [_byte_span(request, size) for request in requests]
    largest = max((end - start for start, end in spans), default=0)
    if largest > (MAX_READ_BYTES if limit is None else limit):
        raise FormatError(
            f"{root / key} is {size} bytes; wordystore reads at most {limit or MAX_READ_BYTES} of it "
            "(the store is damaged, or not what it claims)"
        )
    return [_pread(fd, start, end) for start, end in spans]


def _pread(fd: int, start: int, end: int) -> bytes:
    parts = []
    while start < end:
        part = os.pread(fd, end - start, start)
        if not part:  # the file shrank meanwhile: what is there
            break
        parts.append(part)
        start += len(part)
    return b"".join(parts)


class GuardedLocalStore(LocalStore):
    """A local directory as a zarr store that never leaves it: keys are checked (:func:`check_key`),
    no symbolic link inside it is followed, and only regular files are read (docs/security.md)."""

    def get_sync(self, key, *, prototype=None, byte_range=None):
        data = read_local(self.root, key, [byte_range])
        return None if data is None else (prototype or default_buffer_prototype()).buffer.from_bytes(data[0])

    async def get(self, key, prototype=None, byte_range=None):
        return await asyncio.to_thread(self.get_sync, key, prototype=prototype, byte_range=byte_range)

    async def get_partial_values(self, prototype, key_ranges):
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def exists(self, key: str) -> bool:
        return _local_exists(self.root, key)

    def set_sync(self, key, value) -> None:
        local_path(self.root, key)
        super().set_sync(key, value)

    async def _set(self, key, value, exclusive: bool = False) -> None:
        local_path(self.root, key)
        await super()._set(key, value, exclusive)

    def delete_sync(self, key: str) -> None:
        self._check_writable()
        path = local_path(self.root, key)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)  # a symbolic link itself, never what it points to

    async def delete(self, key: str) -> None:
        self.delete_sync(key)


def _local_exists(root: Path, key: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(local_path(root, key)).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


def as_store(where: str | os.PathLike | Store, read_only: bool, storage_options: dict | None = None) -> Store:
    """A zarr store for a local path or ``file://`` URL, an ``s3://``, ``gs://`` or ``az://`` URL
    (``storage_options``: endpoint, region, credentials; see :func:`wordystore.store.objectstore.open_url`),
    or a store given as is (a local one made a :class:`GuardedLocalStore`)."""
    if isinstance(where, LocalStore) and not isinstance(where, GuardedLocalStore):
        return GuardedLocalStore(where.root, read_only=where.read_only)
    if isinstance(where, Store):
        return where
    text = os.fspath(where)
    if "://" in text and not text.startswith("file://"):
        return open_url(text, storage_options, read_only)
    if storage_options:
        raise ValueError(f"storage_options apply to s3://, gs:// and az:// URLs, not to the local path {text}")
    return GuardedLocalStore(text.removeprefix("file://"), read_only=read_only)


def local_root(store: Store) -> Path | None:
    """The directory of a local store, None for other stores."""
    if not isinstance(store, LocalStore):
        return None
    return store.root if isinstance(store.root, Path) else Path(store.root)


def describe(store: Store) -> str:
    """Where the store is, as a user would name it: a directory, a URL."""
    root = local_root(store)
    if root is not None:
        return str(root)
    return store.url if isinstance(store, ObjectUrlStore) else repr(store)


def get(
    store: Store,
    key: str,
    suffix: int | None = None,
    byte_range: tuple[int, int] | None = None,
    limit: int | None = None,
) -> bytes | None:
    """The value of ``key`` (or its last ``suffix`` bytes, or bytes ``[start, end)``); None if absent.
    More than ``limit`` bytes (default :data:`MAX_READ_BYTES`) is a FormatError, raised before they
    are read where the store can tell the size."""
    request = SuffixByteRequest(suffix) if suffix is not None else None
    if byte_range is not None:
        request = RangeByteRequest(*byte_range)
    root = local_root(store)
    if root is not None:
        data = read_local(root, key, [request], limit)
        return None if data is None else data[0]
    check_key(key)
    limit = MAX_READ_BYTES if limit is None else limit
    if isinstance(store, ObjectUrlStore):
        return store.read(key, request, limit)
    if request is None:
        try:
            size = sync(store.getsize(key))
        except FileNotFoundError:
            return None
        if size > limit:
            raise FormatError(f"{describe(store)}/{key} is {size} bytes; wordystore reads at most {limit} of it")
    buffer = sync(store.get(key, prototype=default_buffer_prototype(), byte_range=request))
    return None if buffer is None else buffer.to_bytes()


def get_ranges(store: Store, key: str, ranges: list[tuple[int, int]]) -> list[bytes]:
    """Several byte ranges ``[start, end)`` of one key."""
    root = local_root(store)
    if root is not None:
        values = read_local(root, key, [RangeByteRequest(*r) for r in ranges])
    elif isinstance(store, ObjectUrlStore):
        values = store.read_ranges(check_key(key), ranges)
    else:
        values = [get(store, key, byte_range=r) for r in ranges]
    if values is None or any(v is None for v in values):
        raise FileNotFoundError(f"{key} disappeared from {describe(store)} while being read")
    return values


def get_tail_then(
    store: Store, key: str, suffix: int, then: Callable[[bytes], list[tuple[int, int]]], limit: int | None = None
) -> tuple[bytes, list[bytes]] | None:
    """The last ``suffix`` bytes of ``key`` (at most ``limit``; None if absent), and the byte ranges
    ``[start, end)`` that ``then`` names from them (a shard's index, then the chunks it lists): a
    local file is opened once for both."""
    root = local_root(store)
    if root is None:
        tail = get(store, key, suffix=suffix, limit=limit)
        return None if tail is None else (tail, get_ranges(store, key, then(tail)))
    parts = read_local_then(root, key, [SuffixByteRequest(suffix)], lambda first: then(first[0]), limit)
    return None if parts is None else (parts[0], parts[1:])


def put(store: Store, key: str, data: bytes) -> None:
    """Replace ``key`` atomically (LocalStore writes a temporary file and renames it; object
    stores replace objects whole, a writer's fenced: :mod:`wordystore.store.objectstore`)."""
    check_key(key)
    if isinstance(store, ObjectUrlStore):
        store.write(key, data)
        return
    buffer = default_buffer_prototype().buffer.from_bytes(data)
    if isinstance(store, LocalStore):
        store.set_sync(key, buffer)
    else:
        sync(store.set(key, buffer))


def get_versioned(store: ObjectUrlStore, key: str, limit: int) -> tuple[bytes, str] | None:
    """An object's value and its version (etag), for :func:`put_if`; None if absent (object storage only)."""
    return store.read_versioned(check_key(key), limit)


def put_if(store: ObjectUrlStore, key: str, data: bytes, version: str | None) -> str:
    """Put ``key`` only if absent (``version`` None) or still at ``version``; returns its new version.
    Refused: :class:`wordystore.store.objectstore.ConditionFailed` (object storage only: the writer lease's
    primitive)."""
    return store.write_if(check_key(key), data, version)


def delete(store: Store, key: str) -> None:
    """Delete ``key`` (absent is fine); local stores also drop the directories it leaves empty."""
    check_key(key)
    root = local_root(store)
    if isinstance(store, ObjectUrlStore):
        store.remove(key)
        return
    if root is None:
        sync(store.delete(key))
        return
    store.delete_sync(key)
    parent = local_path(root, key).parent
    while parent != root and not parent.is_symlink():
        try:
            if any(parent.iterdir()):
                break
            parent.rmdir()
        except OSError:  # removed by another delete, or filled by a put, meanwhile: theirs now
            break
        parent = parent.parent


def exists(store: Store, key: str) -> bool:
    root = local_root(store)
    if root is not None:
        return _local_exists(root, key)
    if isinstance(store, ObjectUrlStore):
        return store.etag(check_key(key)) is not None
    return sync(store.exists(check_key(key)))


def list_prefix(store: Store, prefix: str) -> list[str]:
    """Every key under ``prefix`` (a directory-like prefix such as ``"embeddings/"``, or ``""``)."""
    root = local_root(store)
    if prefix:
        check_key(prefix.rstrip("/"))
    if root is not None:  # zarr's rglob fails when a running writer removes a compacted directory
        top = _no_links(root, prefix.rstrip("/").split("/")) if prefix else root
        return [
            os.path.relpath(os.path.join(folder, name), root) for folder, _, names in os.walk(top) for name in names
        ]  # os.walk skips vanished ones, follows no link
    if isinstance(store, ObjectUrlStore):
        return list(store.sizes(prefix))

    async def collect():
        return [key async for key in store.list_prefix(prefix)]

    return sync(collect())


def temporary_keys(store: Store) -> list[str]:
    """The temporary files a killed writer left in ``store`` (:func:`wordystore.format.keys.is_temporary_key`),
    sorted; only ``resume`` and ``verify --repair``, holding the writer lock, remove them."""
    return sorted(key for key in list_prefix(store, "") if is_temporary_key(key))


def holds_trajectory(where: str | os.PathLike, storage_options: dict | None = None) -> bool:
    """Whether ``where`` already holds a store: its root document (zarr v3's ``zarr.json``) exists.

    A command that creates a store asks this first, to refuse before anything slow loads. A local
    path is looked at directly; a URL asks its bucket (one request).

    Parameters
    ----------
    where : str or os.PathLike
        A directory, or an ``s3://``, ``gs://`` or ``az://`` URL.
    storage_options : dict, optional
        Endpoint, region and credentials of a URL.

    Returns
    -------
    bool
        True when a root document is there (a trajectory, or another zarr store).

    Examples
    --------
    >>> import wordystore
    >>> wordystore.holds_trajectory("runs/nothing-here.zarr")
    False
    """
    text = os.fspath(where)
    if "://" not in text or text.startswith("file://"):
        return (Path(text.removeprefix("file://")) / ZARR_JSON).is_file()
    return exists(as_store(text, read_only=True, storage_options=storage_options), ZARR_JSON)


def stored_bytes(where: str | os.PathLike, storage_options: dict | None = None) -> int:
    """Bytes a store holds on disk or in its bucket now: every key under it, both tiers, documents
    and resume states. A running writer's store may be counted while it writes and compacts.

    Parameters
    ----------
    where : str or os.PathLike
        A directory, or an ``s3://``, ``gs://`` or ``az://`` URL.
    storage_options : dict, optional
        Endpoint, region and credentials of a URL (see :func:`wordystore.store.objectstore.open_url`).

    Returns
    -------
    int
        The sum of the keys' sizes in bytes; a key deleted while it is counted counts 0.

    Examples
    --------
    >>> import wordystore
    >>> wordystore.stored_bytes("runs/quick.zarr")  # doctest: +SKIP
    3051021
    """
    return size(as_store(where, read_only=True, storage_options=storage_options))


def size(store: Store, prefix: str = "") -> int:
    """Bytes of every key under ``prefix``; a key that vanishes meanwhile (a writer compacting)
    counts 0."""
    if isinstance(store, ObjectUrlStore):
        if prefix:
            check_key(prefix.rstrip("/"))
        return sum(store.sizes(prefix).values())
    root, total = local_root(store), 0
    for key in list_prefix(store, prefix):
        try:
            total += os.lstat(root / key).st_size if root is not None else sync(store.getsize(key))
        except FileNotFoundError:
            pass
    return total


def sync_to_disk(store: Store, keys: list[str]) -> None:
    """fsync the files of ``keys`` (local stores; object stores are durable once a put returns)."""
    root = local_root(store)
    if root is None:
        return
    for key in keys:
        fd = os.open(local_path(root, key), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class WriterLock:
    """An exclusive ``flock`` on a file in the store's directory, held while a writer is open.

    The kernel drops it when the process dies, so a killed writer never leaves a stale lock. On
    object storage the writer holds a lease instead (:mod:`wordystore.store.lease`); other stores (a
    zarr store object given as is) are not locked (docs/format.md).
    """

    generation = 0  # a directory's writers need no fencing token (the lease's: docs/format.md)

    def __init__(self, store: Store):
        self._fd = None
        root = local_root(store)
        if root is None:
            return
        root.mkdir(parents=True, exist_ok=True)
        try:  # never through a link (a hostile store's lock file could point at a file to truncate)
            fd = os.open(
                root / WRITER_LOCK_KEY, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644
            )
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise FormatError(
                    f"{root / WRITER_LOCK_KEY} is a symbolic link; the writer lock is a regular file of "
                    "the store (delete the link)"
                ) from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise FormatError(f"{root / WRITER_LOCK_KEY} is not a regular file; the writer lock is one (delete it)")
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
        if key != WRITER_LOCK_KEY:
            delete(store, key)
