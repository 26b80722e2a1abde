"""The fault suite's recording, and the writers and readers it runs in processes of their own
(tests/test_faults.py).

Run as a script, it imports wordystore once and forks each writer and reader from that process
(which touches no store itself, so no thread is forked), so that a kill costs a fork rather than
an interpreter start:

    python tests/faults_writer.py census DIR        # DIR/reference.zarr, uninterrupted; DIR/census.log
                                                    # lists its every store write: "N put|delete KEY PHASE"
    python tests/faults_writer.py kill DIR N...     # DIR/kill-N.zarr: the same run, killed with SIGKILL
                                                    # just before its N-th store write; prints what happened
    python tests/faults_writer.py readers DIR       # one writer and 4 readers polling it; prints their counts
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
import time
import traceback

import ml_dtypes
import numpy as np
import torch

import wordystore
from wordystore import AdamPrediction, Kind
from wordystore.read import reading
from wordystore.store import storage

VOCAB = 6
KINDS = {
    "emb": Kind((VOCAB, 2), "bfloat16", ("token", "dim")),
    "grads": Kind((VOCAB, 2), "bfloat16", ("token", "dim")),
    "momentum": Kind((VOCAB, 2), "bfloat16", ("token", "dim")),
    # 4 slots x 4096 dims x 32 rows make an inner chunk of 1 MiB: shards of two chunks
    "wide": Kind((8, 4096), "bfloat16", ("slot", "dim")),
    "grad_norm": Kind((), "float32"),
    "loss": Kind((), "float32"),
}
PREDICTIONS = {"momentum": AdamPrediction("exp_avg", "grads", "grad_norm", 0.9, 1.0)}
TOKEN_SETS = {"a": [0, 2, 4], "b": [1, 3, 5]}
BLOCK_ROWS, CHUNK_ROWS = 2, 4
STEPS = [3 * i + 1 for i in range(13)]  # 13 rows: a partial last block and chunk
FLUSH_AFTER = 4  # the writer flushes after its 5th row: a partial block, rewritten whole later
KEEP_STATES = 2


def row(step: int) -> dict[str, np.ndarray]:
    """The tensors of one step: random, different for every step, reproducible."""
    rng = np.random.default_rng(step)

    def bf16(shape):
        return rng.standard_normal(shape).astype(np.float32).astype(ml_dtypes.bfloat16)

    grads = bf16((VOCAB, 2))
    return {
        "emb": bf16((VOCAB, 2)),
        "grads": grads,
        "momentum": bf16((VOCAB, 2)) * ml_dtypes.bfloat16(0.01),
        "wide": bf16((8, 4096)),
        "grad_norm": np.float32(np.linalg.norm(grads.astype(np.float32))),
        "loss": np.float32(step / 7),
    }


def rows(steps) -> dict[str, np.ndarray]:
    """The reference data of these steps, kind by kind, with ``recorded_steps``."""
    per_step = [row(step) for step in steps]
    data = {
        name: np.stack([r[name] for r in per_step]) if per_step else np.zeros((0, *kind.shape), kind.numpy_dtype)
        for name, kind in KINDS.items()
    }
    return {**data, "recorded_steps": np.asarray(list(steps), np.int64)}


def state(step: int) -> tuple[dict[str, torch.Tensor], dict]:
    """The resume state a trainer would keep after ``step``."""
    return {"weights": torch.full((3,), float(step))}, {"after_step": step}


def create(path, **args) -> wordystore.TrajectoryWriter:
    """The suite's writer, its pools in this process unless asked otherwise: the census counts, and
    the kills stop, the store writes of this process (a child process's are tested in test_pools.py)."""
    args.setdefault("writer_process", False)
    return wordystore.create(
        path,
        KINDS,
        token_sets=TOKEN_SETS,
        config={"suite": "faults"},
        block_rows=BLOCK_ROWS,
        chunk_rows=CHUNK_ROWS,
        predictions=PREDICTIONS,
        keep_states=KEEP_STATES,
        **args,
    )


def append(w: wordystore.TrajectoryWriter, steps, flush_after: int | None = None) -> None:
    w.set_state_provider(lambda: state(w.last_step))
    for i, step in enumerate(steps):
        w.append(step, **row(step))
        if i == flush_after:
            w.flush()


PHASE = "start"


def write(path) -> None:
    """The run every kill interrupts: create, append (flushing once), close."""
    global PHASE
    PHASE = "create"
    w = create(path)
    PHASE = "append"
    append(w, STEPS, FLUSH_AFTER)
    PHASE = "close"
    w.close()
    PHASE = "closed"


def instrument(kill_at: int | None, log=None) -> None:
    """Count every store write (put, delete); log each; SIGKILL this process before the ``kill_at``-th."""
    count = itertools.count(1)
    for op in ("put", "delete"):
        original = getattr(storage, op)

        def wrapped(store, key, *args, _op=op, _original=original):
            n = next(count)
            if log is not None:
                log.write(f"{n} {_op} {key} {PHASE}\n")
                log.flush()
            if n == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return _original(store, key, *args)

        setattr(storage, op, wrapped)


def forked(work) -> int:
    """Run ``work()`` in a child process; its pid. The child exits 0 if it returns, 1 if it raises."""
    pid = os.fork()
    if pid == 0:
        status = 0
        try:
            work()
        except BaseException:
            traceback.print_exc()
            status = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    return pid


def outcome(pid: int) -> str:
    status = os.waitpid(pid, 0)[1]
    if os.WIFSIGNALED(status):
        return "killed" if os.WTERMSIG(status) == signal.SIGKILL else f"signal {os.WTERMSIG(status)}"
    return "finished" if os.WEXITSTATUS(status) == 0 else "failed"


def census(out: str) -> None:
    def work():
        with open(os.path.join(out, "census.log"), "w") as log:
            instrument(None, log)
            write(os.path.join(out, "reference.zarr"))

    print(json.dumps({"census": outcome(forked(work))}))


def kill(out: str, points: list[int]) -> None:
    results = {}
    for n in points:

        def work(n=n):
            instrument(n)
            write(os.path.join(out, f"kill-{n}.zarr"))

        results[n] = outcome(forked(work))
    print(json.dumps(results))


# -- readers polling a writer -----------------------------------------------------------------------

READ_STEPS = list(range(0, 120, 2))
READ_KINDS = ("emb", "momentum", "wide", "loss")


def slow_writer(path: str) -> None:
    """Appends READ_STEPS slowly, so that readers poll between its blocks and compactions."""
    w = create(path)
    for i, step in enumerate(READ_STEPS):
        w.append(step, **row(step))
        time.sleep(0.01)
        if i % 7 == 3:
            w.flush()
    w.close()
    open(path + ".done", "w").close()


def reader(path: str, number: int, out: str) -> None:
    """Poll the store: open or refresh, read; every read must be a committed prefix equal to the
    reference. Writes its counts to ``out``."""
    reference = rows(READ_STEPS)
    catch_ups = []
    original = reading.StoreReader.catch_up_compaction

    def counted(self):  # counts the retries the reader makes when a writer compacted rows under it
        moved = original(self)
        catch_ups.append(moved)
        return moved

    reading.StoreReader.catch_up_compaction = counted
    reads, seen, t = 0, [], None
    while True:
        done = os.path.exists(path + ".done")  # before reading: the last read sees every row
        try:
            if t is None or reads % 5 == number:
                t = wordystore.open(path)
        except (FileNotFoundError, wordystore.FormatError):  # not created yet (no commit record)
            assert reads == 0, "a store that opened once must keep opening"
            time.sleep(0.01)
            continue
        n = len(t.refresh())
        assert not seen or n >= seen[-1], f"rows went from {seen[-1]} to {n}"
        assert t.steps.tolist() == READ_STEPS[:n], f"steps {t.steps.tolist()} are not a prefix of the run's"
        for name in READ_KINDS[number % 2 :: 2] if not done else READ_KINDS:  # half the kinds, all at the end
            got = t[name].numpy(slice(0, n))
            assert got.tobytes() == reference[name][:n].tobytes(), f"reader {number}: {name}[:{n}] differs"
        reads += 1
        seen.append(n)
        if done:
            break
        time.sleep(0.005)  # poll, leaving the writer most of the machine
    with open(out, "w") as f:
        json.dump({"reads": reads, "rows_seen": sorted(set(seen)), "catch_ups": sum(catch_ups)}, f)


def readers(out: str) -> None:
    path = os.path.join(out, "polled.zarr")
    pids = {"writer": forked(lambda: slow_writer(path))}
    for number in range(4):
        pids[f"reader{number}"] = forked(
            lambda number=number: reader(path, number, os.path.join(out, f"reader{number}.json"))
        )
    print(json.dumps({name: outcome(pid) for name, pid in pids.items()}))


if __name__ == "__main__":
    command, directory, *numbers = sys.argv[1:]
    {
        "census": lambda: census(directory),
        "kill": lambda: kill(directory, [int(n) for n in numbers]),
        "readers": lambda: readers(directory),
    }[command]()
