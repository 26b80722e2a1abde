"""One writer at a time on object storage, and nothing committed ever lost, against real S3 servers
on loopback (moto, SeaweedFS; tests/s3_servers.py): a second writer is refused naming the holder; a
stale writer (its lease expired, another took over) can neither commit nor overwrite anything the
new holder wrote; kill -9 mid-write then resume loses nothing committed (the resume waits out the
lease and says so); a reader during compactions sees only exact rows; every write is conditional
and nothing is renamed, also when convert builds a whole store."""

import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("obstore")

from s3_rows import Rows  # noqa: E402
from s3_servers import CountingProxy, moto_server, s3_bucket, s3_server, seaweedfs_server  # noqa: E402,F401

import wordystore  # noqa: E402
from wordystore.cli import main  # noqa: E402
from wordystore.errors import LeaseWaitWarning, StaleWriterError, StoreLockedError, WriterFailedError  # noqa: E402
from wordystore.store import lease  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def short_lease(monkeypatch):
    """Leases of 1.5 s (renewed every 0.5 s), so that expiries take no longer than a test should."""
    monkeypatch.setattr(lease, "DURATION_S", 1.5)
    return 1.5


def test_a_second_writer_is_refused_naming_the_holder_and_its_expiry(s3_bucket, short_lease):
    url, rows = f"{s3_bucket.url}/run.zarr", Rows()
    with wordystore.create(url, rows.kinds()) as first:
        rows.append(first, 0, 3)
        with pytest.warns(LeaseWaitWarning), pytest.raises(StoreLockedError) as refused:
            wordystore.resume(url)  # watches the lease until its holder renews it: alive
        assert f"{url} is open for writing by " in str(refused.value)
        assert "lease generation 1, renewed just now, expires in" in str(refused.value)
        rows.append(first, 3, 9)
    t = wordystore.open(url)
    assert rows.check(t) == 9 and t.commit_record.writer_generation == 1


def test_a_stale_writer_can_neither_commit_nor_overwrite_what_the_new_holder_wrote(s3_bucket, short_lease):
    url, rows, other = f"{s3_bucket.url}/run.zarr", Rows(seed=0), Rows(seed=1)
    stale = wordystore.create(url, rows.kinds())
    rows.append(stale, 0, 12)
    stale.flush()  # rows 8..11: a partial block, which the next writer rewrites whole
    held = stale._lock
    held._stop.set()  # as a paused process: no renewal from now on
    time.sleep(short_lease + lease.skew(short_lease) + 0.2)
    with pytest.raises(StaleWriterError, match="was not renewed within"):
        held.check()  # its own clock tells the stale writer first
    lease.DURATION_S = 30.0
    new = wordystore.resume(url)  # takes the expired lease over at once: generation 2, then the fencing commit
    assert new._lock.generation == 2 and new.committed == 12
    rows.append(new, 12, 20)
    new.flush()

    held._valid_until = math.inf  # the stale writer, paused between its clock check and its put
    with pytest.raises(WriterFailedError) as failed:
        other.append(stale, 12, 24)  # other values for rows the new holder committed, and rows past them
        stale.flush()
    assert isinstance(failed.value.__cause__, StaleWriterError)
    assert "was rewritten by another writer since this one (lease generation 1) wrote it" in str(failed.value.__cause__)
    with pytest.raises(WriterFailedError):
        stale.close()  # it stays failed; the lease it releases is the new holder's now: left alone

    rows.append(new, 20, 28)
    new.close()
    t = wordystore.open(url)
    assert rows.check(t) == 28  # nothing of the stale writer's landed
    assert t.commit_record.writer_generation == 2
    assert wordystore.verify(url).problems == ()


def test_kill_9_mid_write_then_resume_loses_nothing_committed(s3_bucket, short_lease):
    url, rows = f"{s3_bucket.url}/killed.zarr", Rows()
    env = {**__import__("os").environ, "WORDYSTORE_LEASE_SECONDS": str(short_lease)}
    child = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "s3_rows.py"), url, str(rows.vocab), "56"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    reported = 0
    for line in child.stdout:
        reported = int(line.split()[1]) if line.startswith("committed") else reported
        if reported >= 17:  # past two blocks, with rows buffered and a block in flight
            break
    child.kill()
    child.wait()
    committed = len(wordystore.open(url))
    assert committed >= reported - reported % 8 and rows.check(wordystore.open(url)) == committed

    began = time.monotonic()
    with pytest.warns(LeaseWaitWarning, match="waiting up to .* for the writer lease of .* to expire"):
        writer = wordystore.resume(url)
    assert time.monotonic() - began < short_lease + lease.skew(short_lease) + 1.5
    assert writer.committed == committed and writer._lock.generation == 2
    rows.append(writer, committed, 56)
    writer.close()
    t = wordystore.open(url)
    assert rows.check(t) == 56 and wordystore.verify(url).problems == ()


def test_a_reader_during_compactions_sees_only_exact_rows(s3_bucket):
    url, rows = f"{s3_bucket.url}/run.zarr", Rows()
    writer = wordystore.create(url, rows.kinds())
    done, seen, problems = threading.Event(), [], []

    def read_while_written():
        t = wordystore.open(url)
        while not done.is_set():
            try:
                t.refresh()
                seen.append(rows.check(t))
            except Exception as exc:  # what a reader would meet
                problems.append(f"{type(exc).__name__}: {exc}")

    reader = threading.Thread(target=read_while_written)
    reader.start()
    for r in range(72):  # two compactions while appending, the rest at close
        rows.append(writer, r, r + 1)
    writer.close()
    time.sleep(0.3)
    done.set()
    reader.join()
    assert problems == [] and len(seen) > 2 and max(seen) == 72


def test_every_write_is_conditional_and_nothing_is_renamed(s3_bucket, tmp_path, monkeypatch):
    rows = Rows()
    with CountingProxy(s3_bucket.server.endpoint) as proxy:
        url = f"{s3_bucket.url}/run.zarr"
        with wordystore.create(url, rows.kinds(), storage_options={"endpoint": proxy.endpoint}) as writer:
            rows.append(writer, 0, 40)  # a compaction at 32, the rest at close
        written = proxy.snapshot()["requests"]
        assert written.get("PUT", 0) == 0 and written.get("COPY", 0) == 0, written  # only PUT-create, PUT-if-match
        assert written["PUT-create"] > 40 and written["PUT-if-match"] > 5

        local = tmp_path / "local.zarr"
        with wordystore.create(local, rows.kinds()) as writer:
            rows.append(writer, 0, 12)
        proxy.reset()
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        assert main(["convert", str(local), f"{s3_bucket.url}/converted.zarr", "--quiet"]) == 0  # built in place
        assert proxy.snapshot()["requests"].get("COPY", 0) == 0
        assert rows.check(wordystore.open(f"{s3_bucket.url}/converted.zarr")) == 12
