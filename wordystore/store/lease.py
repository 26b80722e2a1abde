"""One writer at a time: :func:`writer_lock` takes a directory's ``flock``
(:class:`wordystore.store.storage.WriterLock`) or, on object storage, a **lease** (:class:`Lease`) made of
conditional writes only, which also fences every write of the store (docs/format.md, "Object storage").

The lease is the object ``.wordystore-writer.lock`` at the store's root
(:class:`wordystore.format.records.LeaseRecord`: owner, generation, expires_at, duration_s):

* **taking it**: none there, a create-only put of generation 1 (or one more than the generation
  ``commit.json`` names). One there whose expiry has passed (``expires_at`` + skew by the wall
  clock, or ``duration_s`` + skew by this process's clock since it was first seen unchanged), a put
  If-Match on it of generation + 1. One that is renewed while this writer watches it has a live
  holder: :class:`~wordystore.errors.StoreLockedError`, naming it and when its lease expires.
  Meanwhile the writer waits, and says so (:class:`~wordystore.errors.LeaseWaitWarning`): a writer
  killed with kill -9 holds its lease until it expires, 30 s at most by default. Two takers race on
  one condition: one wins, the other sees a new version and is refused.
* **then** the new holder's first write is the *fencing commit*: the commit record it read, with
  its generation (``writer_generation``), put If-Match on the version it read. From then on the
  store refuses every write of an older holder that the new one has made (see
  :mod:`wordystore.store.objectstore`: every write is If-Match or create-only).
* **renewing it**: every ``duration_s / 3`` a background thread puts a later expiry If-Match on the
  lease's last version. The holder trusts its lease until the start of its last successful
  renewal + ``duration_s`` - skew, by its own monotonic clock; past that, or once a renewal is
  refused (another writer took it over), every write raises
  :class:`~wordystore.errors.StaleWriterError` and the writer fails, its committed rows intact.
* **releasing it**: a put of ``expires_at`` 0, If-Match (S3 has no conditional delete), so the
  next writer takes it at once.

Durations: ``WORDYSTORE_LEASE_SECONDS`` (default 30), skew ``min(2 s, duration / 4)``. A committer
of several rank writers holds one lease; its generation is the fencing token the ranks' writes
carry (docs/scale.md).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
import threading
import time
import warnings
import weakref

from wordystore.errors import FormatError, LeaseWaitWarning, StaleWriterError, StorageError, StoreLockedError
from wordystore.format.keys import COMMIT_KEY
from wordystore.format.records import MAX_LEASE_GENERATION, LeaseRecord
from wordystore.store import json_documents
from wordystore.store.objectstore import ConditionFailed, ObjectUrlStore
from wordystore.store.storage import WriterLock, describe

DURATION_S = float(os.environ.get("WORDYSTORE_LEASE_SECONDS", 30))


def writer_lock(store) -> Lease | WriterLock:
    """The store's writer lock, held until ``release()``: a lease of :data:`DURATION_S` on object
    storage (which fences the store's writes from then on), a ``flock`` on a directory; refused
    while another writer holds it."""
    if isinstance(store, ObjectUrlStore):
        return Lease.take(store, DURATION_S)
    return WriterLock(store)


def skew(duration_s: float) -> float:
    """How far two clocks may disagree: a lease counts as expired this much after its expiry."""
    return min(2.0, duration_s / 4)


class Lease:
    """A writer's lease on a store on object storage; :meth:`take` gets one (module docstring)."""

    def __init__(self, store: ObjectUrlStore, record: LeaseRecord, version: str, taken: float):
        self.store, self.record = store, record
        self._version = version
        self._valid_until = taken + record.duration_s - skew(record.duration_s)
        self._lost: str | None = None  # why this writer may no longer write
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_renew_while_held, args=(weakref.ref(self), self._stop), name="wordystore-lease", daemon=True
        )
        self._thread.start()

    @property
    def generation(self) -> int:
        return self.record.generation

    @classmethod
    def take(cls, store: ObjectUrlStore, duration_s: float) -> Lease:
        """Take the lease of ``store`` (module docstring), then fence the store's commit record."""
        if not 0 < duration_s <= 86400:
            raise ValueError(f"a writer lease lasts more than 0 and at most 86400 s; got {duration_s}")
        owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        watched: tuple[str, float] | None = None  # (version, when first seen) of a lease held by another
        while True:
            taken = time.monotonic()
            current, version = json_documents.read_lease(store)
            if current is None:
                generation = _newest_generation(store) + 1
            else:
                if watched is not None and watched[0] != version:  # renewed (or taken) while we watched
                    raise StoreLockedError(_held(store, current))
                watched = watched or (version, taken)
                left = min(
                    current.expires_at + skew(current.duration_s) - time.time(),
                    watched[1] + current.duration_s + skew(current.duration_s) - taken,
                )
                if left > 0:
                    if watched[1] == taken:  # say it once
                        warnings.warn(_waiting(store, current, left), LeaseWaitWarning, stacklevel=3)
                    time.sleep(min(left, 1.0, duration_s / 6))
                    continue
                generation = current.generation + 1
            if generation > MAX_LEASE_GENERATION:
                raise FormatError(f"{describe(store)}: the writer lease's generation {generation - 1} is at its limit")
            record = LeaseRecord(owner, generation, time.time() + duration_s, duration_s)
            try:
                version = json_documents.write_lease(store, record, version)
            except ConditionFailed:  # another writer took it first: look again (and be refused)
                continue
            lease = cls(store, record, version, taken)
            try:
                lease._fence()
            except BaseException:
                lease.release()
                raise
            return lease

    def _fence(self) -> None:
        """Fence the store's writes with this lease, and rewrite the commit record (if any) with
        this generation, on the version read: no older writer's commit passes after this one."""
        self.store.fence_with(self)
        try:
            record, version = json_documents.read_commit_version(self.store)
        except FormatError:  # none yet (create writes it), or damaged (verify --repair rewrites it, fenced)
            return
        if record.writer_generation >= self.generation:
            raise StaleWriterError(
                f"{describe(self.store)}: {COMMIT_KEY} was written by lease generation "
                f"{record.writer_generation}, this writer holds {self.generation}: another writer "
                "took the store over meanwhile"
            )
        self.store.remember(COMMIT_KEY, version)
        json_documents.write_commit(self.store, dataclasses.replace(record, writer_generation=self.generation))

    # -- what the store's fenced writes ask (wordystore.store.objectstore.Fence) ----------------------------

    def check(self) -> None:
        """Raise StaleWriterError unless this lease is still valid by this process's clock."""
        if self._lost is not None:
            raise StaleWriterError(
                f"{describe(self.store)}: this writer's lease (generation {self.generation}) "
                f"{self._lost}; it writes nothing more"
            )
        if time.monotonic() > self._valid_until:
            raise StaleWriterError(
                f"{describe(self.store)}: this writer's lease (generation {self.generation}) was "
                f"not renewed within {self.record.duration_s:g} s (the process was paused, or the "
                "store unreachable); another writer may have taken over, so it writes nothing more"
            )

    def still_ours(self) -> bool:
        """Read the lease object: is it still this writer's?"""
        current, _ = json_documents.read_lease(self.store)
        return current is not None and (current.owner, current.generation) == (self.record.owner, self.generation)

    # -- renewing and releasing -------------------------------------------------------------------------

    def renew(self) -> None:
        """Extend the lease by ``duration_s`` (If-Match on its last version); a refusal means another
        writer took it over: the lease is lost."""
        with self._lock:
            self.check()
            started = time.monotonic()
            record = dataclasses.replace(self.record, expires_at=time.time() + self.record.duration_s)
            try:
                self._version = json_documents.write_lease(self.store, record, self._version)
            except ConditionFailed:
                self._lost = "was taken over by another writer"
                raise
            self.record, self._valid_until = record, started + record.duration_s - skew(record.duration_s)

    def release(self) -> None:
        """Stop renewing and let the next writer take the lease at once."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            if self._lost is not None:
                return
            self._lost = "was released"
            try:
                json_documents.write_lease(self.store, dataclasses.replace(self.record, expires_at=0.0), self._version)
            except (ConditionFailed, StorageError):  # taken over, or unreachable: it expires anyway
                pass

    def __del__(self):  # a writer dropped without close() must not hold the store until its lease expires
        if self._lost is None:
            try:
                self.release()
            except Exception:  # interpreter shutdown
                pass


def _renew_while_held(ref: weakref.ref, stop: threading.Event) -> None:
    """The renewal thread: every duration / 3, sooner again after a failed try (a passing network
    error); it ends when the lease is released, lost or dropped."""
    interval = 0.0
    while True:
        lease = ref()
        if lease is None:
            return
        duration = lease.record.duration_s
        del lease  # hold no reference while waiting: a dropped writer's lease must be collectable
        if stop.wait(interval or duration / 3):
            return
        lease = ref()
        if lease is None:
            return
        try:
            lease.renew()
            interval = 0.0
        except (ConditionFailed, StaleWriterError):
            return
        except Exception:  # unreachable for now: try again soon (check() refuses writes past the deadline)
            interval = min(1.0, duration / 6)
        del lease


def _newest_generation(store) -> int:
    """The generation the commit record names (0: none): a new lease starts above it, even if the
    lease object was deleted."""
    try:
        return json_documents.read_commit(store).writer_generation
    except (FormatError, FileNotFoundError):
        return 0


def _held(store, lease: LeaseRecord) -> str:
    return (
        f"{describe(store)} is open for writing by {lease.owner} (lease generation {lease.generation}, renewed "
        f"just now, expires in {max(0.0, lease.expires_at - time.time()):.0f} s); one writer at a time: close it "
        "first, or open the store read-only with trajectory.open"
    )


def _waiting(store, lease: LeaseRecord, left: float) -> str:
    return (
        f"{describe(store)}: waiting up to {left:.0f} s for the writer lease of {lease.owner} (generation "
        f"{lease.generation}) to expire: a writer that was killed holds it until then (if it is renewed "
        "meanwhile, its writer is alive and this one is refused)"
    )
