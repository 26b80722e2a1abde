"""A writer whose background write fails releases the store's lock at once, so that, the cause
fixed, ``wordystore.resume`` goes on in the same process; nothing committed is lost.

Each failure is a real one: a regular file stands where the writer must make a directory, so the
write of a hot block (surfaced by ``append``, ``flush`` or ``close``) or of a main shard (the
background compaction, surfaced by ``append``; the final one in ``close``) fails with an OSError.
"""

import shutil

import ml_dtypes
import numpy as np
import pytest

import wordystore
from wordystore import Kind

KINDS = {"emb": Kind((6, 2), "bfloat16", ("token", "dim")), "loss": Kind((), "float32", ())}
BLOCK, CHUNK = 2, 4


def row(step: int) -> dict:
    return {"emb": np.full((6, 2), step, ml_dtypes.bfloat16), "loss": float(step)}


def started(path, rows: int, flush: bool = False) -> wordystore.TrajectoryWriter:
    """A writer of a new store, given steps ``0 .. rows-1`` (committed, with ``flush``)."""
    w = wordystore.create(path, KINDS, block_rows=BLOCK, chunk_rows=CHUNK)
    for step in range(rows):
        w.append(step, **row(step))
    if flush:
        w.flush()
    return w


def obstruct(path, key: str):
    """A regular file where the writer needs the directory ``key``."""
    target = path / key
    if target.is_dir():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"in the way")
    return target


def append_until_failure(w, start: int) -> int:
    """Append steps from ``start`` until the writer reports its failure; the step it refused."""
    for step in range(start, start + 100):
        try:
            w.append(step, **row(step))
        except wordystore.WriterFailedError as exc:
            assert "rows are committed" in str(exc)
            return step
    raise AssertionError("the failure never surfaced")


def resume_and_finish(path, obstacle, committed: int) -> None:
    """With the obstacle gone, a writer in this same process goes on after the committed rows."""
    obstacle.unlink()
    t = wordystore.open(path)
    assert len(t) == committed and t.loss[:].tolist() == [float(s) for s in range(committed)]
    with wordystore.resume(path) as w:  # no StoreLockedError naming this process
        for step in range(committed, 20):
            w.append(step, **row(step))
    t = wordystore.open(path)
    assert t.loss[:].tolist() == [float(s) for s in range(20)] and t.steps.tolist() == list(range(20))
    assert wordystore.verify(path).ok


def test_a_failed_block_write_surfaced_by_append_releases_the_lock(tmp_path):
    path = tmp_path / "t.zarr"
    w = started(path, 2, flush=True)
    obstacle = obstruct(path, "hot/emb/c/1")  # the block of rows 2..3
    append_until_failure(w, 2)
    resume_and_finish(path, obstacle, 2)
    with pytest.raises(wordystore.WriterFailedError):  # the failed writer stays failed
        w.append(99, **row(99))
    with pytest.raises(wordystore.WriterFailedError):
        w.close()


@pytest.mark.parametrize("surfaced_by", ["flush", "close"])
def test_a_failed_block_write_surfaced_by_flush_or_close_releases_the_lock(tmp_path, surfaced_by):
    path = tmp_path / "t.zarr"
    w = started(path, 3)
    obstacle = obstruct(path, "hot/emb/c/1")
    with pytest.raises(wordystore.WriterFailedError, match="2 rows are committed"):
        getattr(w, surfaced_by)()
    resume_and_finish(path, obstacle, 2)


def test_a_failed_compaction_surfaced_by_append_releases_the_lock(tmp_path):
    path = tmp_path / "t.zarr"
    w = started(path, 0)
    obstacle = obstruct(path, "emb/c/1")  # the main shard of rows 4..7
    failed_at = append_until_failure(w, 0)
    assert failed_at > CHUNK  # the rows before were committed; the compaction of 4..7 failed
    committed = len(wordystore.open(path))
    assert wordystore.open(path).commit_record.compacted_rows == CHUNK
    resume_and_finish(path, obstacle, committed)


def test_a_failed_final_compaction_in_close_releases_the_lock(tmp_path):
    path = tmp_path / "t.zarr"
    w = started(path, 6, flush=True)
    obstacle = obstruct(path, "emb/c/1")
    with pytest.raises(wordystore.WriterFailedError, match="6 rows are committed"):
        w.close()
    resume_and_finish(path, obstacle, 6)
