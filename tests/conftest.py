import os
import subprocess

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def restored_environment():
    """Each test leaves the environment as it found it. dask.distributed's LocalCluster sets
    OMP_NUM_THREADS=1 (and MKL_, OPENBLAS_) in its parent's environment for good: a training run
    started later in a child process would then take one thread where the test's own process takes
    two, and round differently."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def small_tmpfs(tmp_path):
    """``mount(size, why)``: a new directory on a tmpfs of ``size`` (e.g. "4k"), for a real ENOSPC.
    Needs root (or CAP_SYS_ADMIN); where mounting is not allowed the test is skipped, saying ``why``
    that is acceptable. Unmounted after the test."""
    mounts = []

    def mount(size: str, why: str):
        where = tmp_path / f"tmpfs-{len(mounts)}"
        where.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                                               capture_output=True).returncode != 0:
            pytest.skip(f"cannot mount a {size} tmpfs here ({why})")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", str(where)], check=True)
