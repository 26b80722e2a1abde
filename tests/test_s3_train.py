"""``wordystore train s3://...`` as a user meets it, on moto's S3 server: killed with SIGKILL mid-run,
then ``--resume`` (which waits out the killed writer's lease and says so), records the same bits
as an uninterrupted local run."""

import os
import signal
import subprocess
import sys

import pytest

pytest.importorskip("obstore")

from s3_servers import moto_server  # noqa: E402,F401
from test_resume import FLAGS, SMALL, assert_same_bits, interrupt  # noqa: E402

from trainer import run  # noqa: E402
from trainer.config import RunConfig  # noqa: E402

STEPS = 24


@pytest.fixture
def bucket(moto_server, tmp_path, monkeypatch):
    for name, value in moto_server.env(tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WORDYSTORE_LEASE_SECONDS", "12")  # the killed writer's lease outlives the resume's start
    return moto_server.new_bucket()


@pytest.mark.s3_slow
def test_train_on_s3_killed_then_resumed_records_the_same_bits_as_locally(bucket, tmp_path):
    url = f"{bucket.url}/runs/wb.zarr"
    command = [sys.executable, "-m", "wordystore.cli", "train", url, "--steps", str(STEPS), *FLAGS]
    killed = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ)
    interrupt(killed, url, 8, signal.SIGKILL)
    resumed = subprocess.run([*command[:5], "--resume", "--quiet"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "wordystore train: warning: " in resumed.stderr and "waiting up to" in resumed.stderr
    assert f"into {url} in " in resumed.stdout.splitlines()[-1]

    run.train(tmp_path / "local.zarr", RunConfig(steps=STEPS, **SMALL), progress=False)
    assert_same_bits(url, tmp_path / "local.zarr")
