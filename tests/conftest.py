import os
import subprocess

import numpy as np
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


def pytest_assertrepr_compare(op, left, right):
    """A failed ``a.tobytes() == b.tobytes()`` of whole arrays says where the bytes first differ and
    how many differ, in a few lines: pytest's own diff of two long byte strings is pages long, and
    on CI (where it does not truncate) takes minutes to compute."""
    if op != "==" or not (isinstance(left, bytes) and isinstance(right, bytes)) or max(len(left), len(right)) < 256:
        return None
    shared = min(len(left), len(right))
    a = np.frombuffer(left, np.uint8, shared)
    b = np.frombuffer(right, np.uint8, shared)
    differ = np.flatnonzero(a != b)
    lines = [f"{len(left):,} bytes == {len(right):,} bytes: {len(differ):,} of the first {shared:,} bytes differ"]
    if len(differ):
        at = int(differ[0])
        lines.append(f"first at byte {at:,}: {left[max(at - 8, 0) : at + 8]!r} != {right[max(at - 8, 0) : at + 8]!r}")
    return lines


@pytest.fixture
def small_tmpfs(tmp_path):
    """``mount(size, why)``: a new directory on a tmpfs of ``size`` (e.g. "4k"), for a real ENOSPC.
    Needs root (or CAP_SYS_ADMIN); where mounting is not allowed the test is skipped, saying ``why``
    that is acceptable. Unmounted after the test."""
    mounts = []

    def mount(size: str, why: str):
        where = tmp_path / f"tmpfs-{len(mounts)}"
        where.mkdir()
        if (
            os.geteuid() != 0
            or subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
            ).returncode
            != 0
        ):
            pytest.skip(f"cannot mount a {size} tmpfs here ({why})")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", str(where)], check=True)
