"""kill -9 of a writing process: the store reopens with every committed step."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import torch

import wordystore
from wordystore import trajectory

WRITER = textwrap.dedent("""
    import sys, numpy as np, wordystore
    from wordystore import Kind
    kinds = {"emb": Kind((300, 8), "float32", ("token", "dim")), "loss": Kind((), "float32", ())}
    with wordystore.create(sys.argv[1], kinds, block_rows=4, chunk_rows=8) as w:
        for step in range(10**6):
            w.append(step, emb=np.full((300, 8), step, np.float32), loss=float(step))
            if w.committed >= 12:
                print(w.committed, flush=True)
""")


def test_kill_minus_9_keeps_every_committed_step_and_resume_goes_on(tmp_path):
    path = tmp_path / "t.zarr"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()  # at least 12 steps are committed
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    t = trajectory.open(path)
    n = len(t)
    assert n >= 12 and n % 4 == 0  # whole blocks of block_rows rows
    np.testing.assert_array_equal(t.steps, np.arange(n))
    np.testing.assert_array_equal(t.emb[:, 5, 3].numpy(), np.arange(n, dtype=np.float32))
    np.testing.assert_array_equal(t.loss[:].numpy(), np.arange(n, dtype=np.float32))

    with wordystore.resume(path) as w:  # the lock died with the process
        assert w.last_step == n - 1
        for step in range(n, n + 6):
            w.append(step, emb=torch.full((300, 8), float(step)), loss=float(step))
    t.refresh()
    np.testing.assert_array_equal(t.loss[:].numpy(), np.arange(n + 6, dtype=np.float32))
    np.testing.assert_array_equal(t.emb[:, -1, -1].numpy(), np.arange(n + 6, dtype=np.float32))
