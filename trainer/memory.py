"""The process's memory: reusing what a training step frees instead of faulting fresh pages in for
the next one (docs/trainer.md, "Memory and speed: keeping freed memory").

Each step of the seed run allocates and frees about 4 GB in a few big blocks (the [32, 128, 50257]
bfloat16 logits, their float32 copy, the log-softmax, and their gradients). glibc serves blocks that
big with a fresh ``mmap`` and returns them with ``munmap``, so every step the kernel maps, zeroes and
faults in about a million 4 KiB pages. Two ways to reuse them instead, neither changing a computed
bit (only where the memory comes from changes):

- jemalloc, preloaded by re-executing the command (:func:`reuse_freed_memory`), told to keep what
  is freed: it reuses freed blocks of any alignment, so the peak stays near what is alive at once;
- glibc told to serve every block from its heap and never trim it (:func:`keep_freed_memory`):
  no re-exec, but torch's 64-byte aligned blocks cannot refill the holes their like left in
  glibc 2.36's heap, which grows to about twice what is alive at once.

Standard library only: ``wordystore train`` calls :func:`reuse_freed_memory` before the training
stack loads, so that a re-exec costs little.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from pathlib import Path

JEMALLOC_VARIABLE = "WORDYSTORE_JEMALLOC"  # the library's path, or "none"; unset: found on the linker's path
# Keep freed pages for reuse, big blocks too (jemalloc otherwise gives blocks over 8 MiB back at once).
JEMALLOC_CONF = "oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1"
PRELOADED = "WORDYSTORE_JEMALLOC_PRELOADED"  # set for the re-executed process: it re-executes no further


def reuse_freed_memory(reexec: bool) -> str:
    """Make this process reuse freed memory; returns how: ``"jemalloc"``, ``"glibc"`` or ``"none"``.

    Parameters
    ----------
    reexec : bool
        Whether this process may be replaced by a new run of its own command line (``sys.orig_argv``):
        True in a process started for one job, False where the caller shares the process (a Python
        session calling ``wordystore.cli.main``).

    With jemalloc at hand (:func:`jemalloc_library`) and ``reexec``, it re-executes the process's
    command with jemalloc preloaded and ``MALLOC_CONF`` set to keep freed pages (a ``MALLOC_CONF``
    already set is kept), and returns in the new process. Otherwise, or where the preloaded library
    did not load, it keeps freed memory in glibc's heap (:func:`keep_freed_memory`). Process-wide
    and not undone; child processes inherit the preload.

    Raises
    ------
    ValueError
        ``WORDYSTORE_JEMALLOC`` names no file.
    """
    if jemalloc_loaded():
        return "jemalloc"
    library = jemalloc_library()
    if library is not None and reexec and PRELOADED not in os.environ:
        preload = " ".join(filter(None, (library, os.environ.get("LD_PRELOAD"))))
        env = {**os.environ, "LD_PRELOAD": preload, PRELOADED: library}
        env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    return "glibc" if keep_freed_memory() else "none"


def jemalloc_library() -> str | None:
    """The jemalloc to preload: ``WORDYSTORE_JEMALLOC``'s path (``none``: no jemalloc), else the
    linker's ``libjemalloc`` (e.g. Debian's ``libjemalloc2``), else None. Linux only."""
    given = os.environ.get(JEMALLOC_VARIABLE)
    if given is not None:
        if given.strip().lower() in ("", "none"):
            return None
        if not Path(given).is_file():
            raise ValueError(
                f"{JEMALLOC_VARIABLE}={given}: no such file; expected the path of libjemalloc.so.2, or none"
            )
        return given
    if platform.system() != "Linux":
        return None
    return ctypes.util.find_library("jemalloc")


def jemalloc_loaded() -> bool:
    """Whether jemalloc is mapped into this process (a preload that failed leaves it out)."""
    try:
        with open("/proc/self/maps") as maps:
            return any("libjemalloc" in line for line in maps)
    except OSError:  # not Linux
        return False


M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Make this process's glibc malloc reuse freed memory instead of unmapping it; True if it could.

    glibc is told to serve every block from its heap (``M_MMAP_MAX`` 0) and never to trim it
    (``M_TRIM_THRESHOLD`` -1), so the next step reuses the blocks the last one freed. The price is
    peak resident memory: 6.8 GB for the recorded seed run instead of 3.1 GB, where the notebook's
    code path takes 3.95 GB, since torch's aligned blocks cannot refill the holes their like left in
    glibc 2.36's heap (docs/trainer.md has the measurements). The numbers computed are unchanged
    (``tests/test_trainer.py`` checks a run with and without it bit for bit).

    Process-wide and not undone. On other C libraries than glibc it does nothing and returns False.

        >>> keep_freed_memory() in (True, False)
        True
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # mmap_max 0: no block gets its own mapping; trim threshold -1: the heap is never trimmed (a
    # threshold of 2 GiB, the largest positive int, still let the heap shrink and regrow by 2.5 GB
    # within a step of the seed run)
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
