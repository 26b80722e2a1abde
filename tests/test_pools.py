"""The writer's pools: sizing, the child-process writer, compaction in step with appends,
backpressure counted and reported (tests/faults_writer.py's run, byte for byte)."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import faults_writer as fw
import pytest
from compaction_wait import wait_for_compaction
from test_faults import assert_rows

import wordystore
from wordystore import BackpressureWarning, WriterPools
from wordystore.cli import main
from wordystore.errors import StoreLockedError
from wordystore.pools import IdlePool
from wordystore.store import storage
from wordystore.write import compaction

HERE = Path(__file__).parent


def test_pools_are_sized_for_training_first(monkeypatch):
    for name in ("WORDYSTORE_WRITE_THREADS", "WORDYSTORE_COMPACTION_THREADS", "WORDYSTORE_WRITER_PROCESS"):
        monkeypatch.delenv(name, raising=False)
    gpu, cpu = WriterPools.for_machine(gpu=True), WriterPools.for_machine(gpu=False)
    assert gpu.process and gpu.ring_blocks == 3 and cpu.process and cpu.ring_blocks == 1  # a child on every machine
    assert "GPU training" in gpu.sized_for and "CPU training" in cpu.sized_for
    monkeypatch.setenv("WORDYSTORE_COMPACTION_THREADS", "0")
    monkeypatch.setenv("WORDYSTORE_WRITER_PROCESS", "0")
    chosen = WriterPools.for_machine(write_threads=3, gpu=True)
    assert (chosen.write_threads, chosen.compaction_threads, chosen.process) == (3, 0, False)
    assert WriterPools.from_dict(chosen.to_dict()) == chosen


@pytest.mark.parametrize(
    "name, value, message",
    [
        (
            "WORDYSTORE_WRITE_THREADS",
            "0",
            r"WORDYSTORE_WRITE_THREADS='0': expected a whole number of threads \(1 or more\)",
        ),
        ("WORDYSTORE_COMPACTION_THREADS", "two", r"expected a whole number of threads \(0 or more\)"),
        ("WORDYSTORE_WRITER_PROCESS", "yes", r"WORDYSTORE_WRITER_PROCESS='yes': expected 0 .* or 1"),
    ],
)
def test_a_bad_pool_setting_is_one_clear_error_before_anything_is_written(tmp_path, monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        fw.create(tmp_path / "t.zarr", writer_process=None)  # None: the environment decides
    assert not (tmp_path / "t.zarr").exists()


def test_an_idle_pool_runs_queued_tasks_in_the_thread_that_waits():
    pool = IdlePool(0, "test")  # no threads of its own: only helpers run its tasks
    ran = []
    futures = [pool.submit(lambda i=i: ran.append((i, threading.get_ident())) or i) for i in range(3)]
    pool.help_until(futures[:2])
    assert [f.result() for f in futures[:2]] == [0, 1] and not futures[2].done()
    pool.shutdown()
    assert futures[2].result() == 2 and {thread for _, thread in ran} == {threading.get_ident()}


def test_the_child_process_writer_records_the_same_bytes_and_info_says_so(tmp_path, capsys):
    for process in (False, True):
        w = fw.create(tmp_path / f"{process}.zarr", writer_process=process, compaction_threads=1)
        fw.append(w, fw.STEPS, fw.FLUSH_AFTER)
        w.close()
        t = assert_rows(tmp_path / f"{process}.zarr", fw.STEPS)
        assert t.commit_record.writer["process"] is process and wordystore.verify(tmp_path / f"{process}.zarr").ok
    assert main(["info", str(tmp_path / "True.zarr")]) == 0
    assert "compaction thread in a child process" in capsys.readouterr().out
    with wordystore.resume(tmp_path / "True.zarr", writer_process=True, keep_states=fw.KEEP_STATES) as w:
        fw.append(w, [100, 101, 102])
    assert_rows(tmp_path / "True.zarr", [*fw.STEPS, 100, 101, 102])


def test_a_failure_in_the_child_process_surfaces_in_the_caller(tmp_path):
    path = tmp_path / "t.zarr"
    w = fw.create(path, writer_process=True)
    (path / "hot" / "emb" / "c").write_text("in the way")  # the first block cannot be written
    fw.append(w, fw.STEPS[:2])
    with pytest.raises(wordystore.WriterFailedError, match="background writer"):
        w.flush()
    with pytest.raises(wordystore.WriterFailedError):
        w.close()
    assert len(wordystore.open(path)) == 0


def test_a_child_process_resuming_rows_left_uncompacted_compacts_them_before_it_waits(tmp_path):
    """A writer killed with compaction far behind (here: compacting only at close) leaves committed
    rows in the hot tier; the resumed writer's first append waits for compaction when it is two
    chunks behind, so the child must compact them at once, not at its first commit."""
    path = tmp_path / "t.zarr"
    script = (
        "import os, signal, sys; import faults_writer as fw; w = fw.create(sys.argv[1], compaction_threads=0); "
        "fw.append(w, fw.STEPS[:12]); w.flush(); os.kill(os.getpid(), signal.SIGKILL)"  # 3 chunks, none compacted
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}  # this checkout's wordystore
    done = subprocess.run([sys.executable, "-c", script, str(path)], cwd=HERE, env=env)
    assert done.returncode == -signal.SIGKILL
    record = wordystore.open(path).commit_record
    assert (record.committed_rows, record.compacted_rows) == (12, 0)
    with wordystore.resume(path, writer_process=True, keep_states=fw.KEEP_STATES) as w:
        fw.append(w, fw.STEPS[12:])
    assert_rows(path, fw.STEPS)


KILLED = """
import os, signal, sys
import faults_writer as fw
w = fw.create(sys.argv[1], writer_process=True)
fw.append(w, fw.STEPS[:9])
w.flush()
fw.append(w, fw.STEPS[9:11])
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_parent_leaves_its_child_to_finish_the_blocks_given_then_the_store_resumes(tmp_path):
    path = tmp_path / "t.zarr"
    done = subprocess.run(
        [sys.executable, "-c", KILLED, str(path)],
        cwd=HERE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])},
    )
    assert done.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 60
    while True:  # the child holds the lock with its parent until it has stopped
        try:
            report = wordystore.verify(path)
            break
        except StoreLockedError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert report.ok and report.verified_rows >= 9  # the blocks flushed, maybe those given after
    w = wordystore.resume(path, keep_states=fw.KEEP_STATES)
    committed = w.committed
    fw.append(w, fw.STEPS[committed:])
    w.close()
    assert_rows(path, fw.STEPS)


@pytest.mark.parametrize("writer_process", [False, True], ids=["threads", "process"])
def test_compaction_keeps_pace_within_two_chunks(tmp_path, writer_process):
    w = fw.create(tmp_path / "t.zarr", writer_process=writer_process, compaction_threads=1)
    for step in range(40):
        w.append(step, **fw.row(step))
        assert w.stats().hot_rows <= 2 * fw.CHUNK_ROWS + fw.BLOCK_ROWS  # two chunks, and blocks in flight
    w.flush()
    wait_for_compaction(w)
    stats = w.stats()
    assert (stats.appended, stats.committed) == (40, 40) and stats.compacted == 40 - 40 % fw.CHUNK_ROWS
    w.close()  # appending as fast as it can, a loop may well have waited: nothing to assert on the warning


def test_backpressure_is_counted_and_reported_at_close(tmp_path, monkeypatch):
    write = compaction.write_hot_shard

    def slow(*args):
        time.sleep(0.1)
        return write(*args)

    monkeypatch.setattr(compaction, "write_hot_shard", slow)
    w = fw.create(tmp_path / "t.zarr", writer_process=False, write_threads=1)
    fw.append(w, range(12))
    assert w.stats().waited_for_ring > 0.5
    with pytest.warns(BackpressureWarning, match=r"could not keep up with appends: rows in .*/s.*appends waited"):
        w.close()
    assert storage.exists(storage.as_store(tmp_path / "t.zarr", read_only=True), "commit.json")
