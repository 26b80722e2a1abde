"""The writer's background work in a child process of its own, so that the training process's
Python never waits for it.

Every moment another thread of the training process holds the GIL, a training loop waits (on a
GPU it is Python-bound; on a CPU its Python runs between the operations), and the writer's
threads take and drop the GIL hundreds of times per row (each codec call, each file operation).
:class:`RemoteBackground` runs the writer's :class:`wordystore.write.committer.Background` in a
spawned child instead, on every machine where it can (a local store, room in ``/dev/shm``): the
ring lives in shared memory (page-locked for a GPU's copies), the training process copies rows
into it and sends one message per block; the child writes, commits and compacts as the in-process writer would, and
answers with the commit record after every commit.

The child is a fresh interpreter (``python -c``, not ``multiprocessing``, which would re-run the
training script's top level in it) connected by a socket pair; messages are pickled by plain
``pickle`` between these two processes only (nothing is read from the store that way). It holds
the store's writer lock with its parent (the same open lock file, inherited), so a killed parent
leaves no second writer possible until the child is gone too; the child stops when its parent's
end of the socket closes, after the blocks it was given. What it commits follows the commit
protocol, exactly as in-process.
"""

from __future__ import annotations

import collections
import os
import pickle
import socket
import subprocess
import sys
import threading
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing import resource_tracker, shared_memory
from multiprocessing.connection import Connection

import torch

from wordystore.errors import WriterFailedError
from wordystore.format.metadata import Metadata
from wordystore.format.records import CommitRecord
from wordystore.pools import WriterPools, idle_only, yield_to_training
from wordystore.store import json_documents, storage
from wordystore.store.resume_state import ResumeState
from wordystore.store.storage import WriterLock
from wordystore.write.committer import Background, Ring

CHILD_NICENESS = 10  # with a GPU training, the child yields to the training loop's thread (the other cores are free)
CHILD = "import sys; from wordystore.write.child_process import main; main(sys.argv[1:])"


class RemoteBackground:
    """A :class:`Background` in a child process, seen from the writer's process: the same
    ``ring``, ``record``, ``write_block``, ``wait_for_compaction``, ``close`` and ``shutdown``."""

    def __init__(
        self,
        store,
        meta: Metadata,
        record: CommitRecord,
        capacity: int,
        durable: bool,
        keep_states: int,
        pools: WriterPools,
        lock: WriterLock,
        pin: bool,
        idle: bool,
    ):
        """``pin``: page-lock the ring for a GPU's copies; ``idle``: the child runs on idle CPU time
        only (training on the CPU keeps every core busy), else at nice :data:`CHILD_NICENESS`."""
        self.pools, self.durable = pools, durable
        self._record, self._where = record, storage.describe(store)
        arrays = meta.arrays()
        self._shm = shared_memory.SharedMemory(create=True, size=max(1, Ring.nbytes(arrays, capacity)))
        buffer = torch.frombuffer(self._shm.buf, dtype=torch.uint8)
        self._pinned = pin and _pin(buffer)
        self.ring = Ring(buffer, arrays, capacity)
        ours, theirs = socket.socketpair()
        self._conn = Connection(ours.detach())
        child, lock_fd = theirs.detach(), lock.fileno()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if isinstance(p, str) and p)}
        self._process = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(child), str(lock_fd)],
            pass_fds=(child, lock_fd),
            env=env,
            stdin=subprocess.DEVNULL,
        )
        os.close(child)
        setup = (str(storage.local_root(store)), self._shm.name, capacity, durable, keep_states, pools, idle)
        _send(self._conn, setup)
        self._cv = threading.Condition()
        self._pending: collections.deque[tuple[Future, int]] = collections.deque()  # (future, end row)
        self._failure: BaseException | None = None
        self._closed_record: CommitRecord | None = None
        self._ready = threading.Event()  # set once the child has opened the store
        self._sender = ThreadPoolExecutor(1, "wordystore-writer-send")  # messages in order, GPU copies waited for
        self._receiver = threading.Thread(target=self._receive, name="wordystore-writer-replies", daemon=True)
        self._receiver.start()

    @property
    def record(self) -> CommitRecord:
        return self._record

    def write_block(self, first: int, n: int, state: ResumeState | None, cuda_event=None) -> Future:
        future = Future()
        with self._cv:
            if self._failure is not None:
                future.set_exception(self._failure)
                return future
            self._pending.append((future, first + n))
        self._sender.submit(self._send, ("block", first, n, state), cuda_event)
        return future

    def help_until(self, future: Future) -> None:
        future.exception()  # the child's threads do the work: nothing to help with here

    def wait_ready(self) -> None:
        """Wait until the child has started (a few seconds once: an interpreter and its imports)."""
        while not self._ready.wait(0.1):
            if self._failure is not None or self._process.poll() is not None:
                return

    def wait_for_compaction(self, limit: int) -> None:
        with self._cv:
            while self._failure is None and self._record.committed_rows - self._record.compacted_rows >= limit:
                self._cv.wait()
            if self._failure is not None:
                raise self._failure

    def close(self) -> None:
        """Have the child compact the rest and stop; raise its failure if any."""
        try:
            self._sender.submit(self._send, ("close",)).result()
            with self._cv:
                while self._failure is None and self._closed_record is None:
                    self._cv.wait()
                if self._failure is not None:
                    raise self._failure
                self._record = self._closed_record
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Stop the child (after the blocks it was given) and free the shared ring (once)."""
        if self.ring is None:
            return
        if self._process.poll() is None:
            try:
                self._sender.submit(self._send, ("stop",)).result()
            except OSError:
                pass
            try:
                self._process.wait(timeout=600)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._sender.shutdown()
        self._conn.close()
        if self._pinned:
            torch.cuda.cudart().cudaHostUnregister(self.ring.buffer.data_ptr())
        self.ring = None
        try:
            self._shm.close()
        except BufferError:  # a view of the ring is still held somewhere: the mapping goes with it
            pass
        self._shm.unlink()

    def _send(self, message, cuda_event=None) -> None:
        """Sender thread: one message to the child (a block once the GPU's copies into it are done)."""
        if cuda_event is not None:
            cuda_event.synchronize()
        _send(self._conn, message)

    def _receive(self) -> None:
        """Receiver thread: the child's commit records, failure or end."""
        while True:
            try:
                kind, *body = _receive(self._conn)
            except (EOFError, OSError):
                self._fail(
                    WriterFailedError(f"the writer process of {self._where} ended (exit code {self._process.poll()})")
                )
                return
            if kind == "failed":
                self._fail(WriterFailedError(f"the writer process of {self._where} failed:\n{body[0]}"))
                return
            if kind == "ready":
                self._ready.set()
                continue
            record = CommitRecord.from_json(body[0], self._where)
            with self._cv:
                self._record = record
                while self._pending and self._pending[0][1] <= record.committed_rows:
                    self._pending.popleft()[0].set_result(None)
                if kind == "closed":
                    self._closed_record = record
                self._cv.notify_all()
            if kind == "closed":
                return

    def _fail(self, failure: BaseException) -> None:
        with self._cv:
            if self._closed_record is None:
                self._failure = self._failure or failure
            while self._pending:
                self._pending.popleft()[0].set_exception(self._failure or failure)
            self._cv.notify_all()


def shared_memory_room(nbytes: int) -> bool:
    """Whether the shared-memory file system (``/dev/shm``) has room for a ring of ``nbytes``: a
    container's is often small, and writing past its end would kill the process (SIGBUS)."""
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize >= nbytes


def _pin(buffer: torch.Tensor) -> bool:
    """Page-lock the shared ring for the GPU's asynchronous copies; False where CUDA refuses."""
    error = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
    return int(getattr(error, "value", error)) == 0


# Plain pickle, not Connection.send: its ForkingPickler hands tensors over through multiprocessing's
# resource sharer, which a ``python -c`` child (another authkey) cannot reach.
def _send(conn: Connection, message) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _receive(conn: Connection):
    return pickle.loads(conn.recv_bytes())


def main(argv: list[str]) -> None:
    """The child process's entry: ``CONN_FD LOCK_FD``, then the setup as the first message."""
    conn, lock_fd = Connection(int(argv[0])), int(argv[1])
    try:
        serve(conn, *_receive(conn), lock_fd)
    finally:
        conn.close()


def serve(
    conn: Connection,
    root: str,
    shm_name: str,
    capacity: int,
    durable: bool,
    keep_states: int,
    pools: WriterPools,
    idle: bool,
    lock_fd: int,
) -> None:
    """The child process: a :class:`Background` over the shared ring, driven by the parent's
    messages ("block", first, n, state), ("close",), ("stop",). With ``idle`` every thread of it
    runs on idle CPU time only (set before any thread starts: they inherit it)."""
    if idle:
        idle_only()
    else:
        yield_to_training(CHILD_NICENESS)
    send_lock = threading.Lock()

    def send(message) -> None:
        with send_lock:
            _send(conn, message)

    shm = shared_memory.SharedMemory(name=shm_name)
    resource_tracker.unregister(shm._name, "shared_memory")  # the parent's to unlink, not this process's tracker
    background = None
    try:
        store = storage.as_store(root, read_only=False)
        meta = json_documents.read_metadata(store)
        layouts = json_documents.read_layouts(store, meta)
        ring = Ring(torch.frombuffer(shm.buf, dtype=torch.uint8), meta.arrays(), capacity)
        background = Background(
            store, meta, json_documents.read_commit(store), layouts, ring, durable, keep_states, pools, idle=idle
        )
        background.on_commit = lambda record: send(("record", record.to_json()))
        failed = []

        def fail(exc: BaseException) -> None:
            if not failed:
                failed.append(True)
                send(("failed", "".join(traceback.format_exception(exc))))

        def report(future: Future) -> None:
            if future.exception() is not None:
                fail(future.exception())

        background.on_compaction_failure = fail
        send(("ready",))

        while True:
            try:
                kind, *body = _receive(conn)
            except EOFError:  # the writer's process is gone: finish the blocks given, stop
                return
            if kind == "block":
                background.write_block(*body).add_done_callback(report)
            elif kind == "close":
                background.close()
                background = None
                send(("closed", json_documents.read_commit(store).to_json()))
                return
            else:
                return
    except BaseException:
        try:
            send(("failed", traceback.format_exc()))
        except OSError:
            pass
    finally:
        if background is not None:
            background.shutdown()
        ring = None
        shm.close()
        os.close(lock_fd)
