"""Keep freed memory for reuse: the seed run's main speed-up on CPU, with every recorded bit unchanged.

Each training step allocates and frees about 4 GB in a few big blocks: the [32, 128, 50257]
bfloat16 logits, their float32 copy, the log-softmax, and the gradients of each in backward.
glibc's malloc serves blocks that big with a fresh ``mmap`` and returns them with ``munmap``, so
every step the kernel maps, zeroes and faults in about a million 4 KiB pages (about 240,000 minor
page faults a second, more system time than training time on a 2-core machine).

:func:`keep_freed_memory` tells glibc to serve every block from its heap and not to trim the heap,
so the next step reuses the blocks the last one freed: after the first few steps almost no page
faults are left. Measured on 8-step runs of the seed config (2 cores; CPU seconds per step after
the first two): 1.2 user + 1.8 system by default, 1.4-1.6 user + 0.03 system with this. The price
is peak resident memory, about 5-7 GB instead of 3.3 GB: the heap keeps its high-water mark, and
torch's 64-byte-aligned allocations leave holes that this glibc (2.36) cannot refill with a block
of the same size, so the heap grows for a few steps before it settles. Transparent huge pages
(``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` or torch's ``THP_MEM_ALLOC_ENABLE=1``) cut the number
of faults a hundredfold but not the kernel's zeroing of fresh memory: 2.3 system seconds per step.
On top of this setting, ``glibc.malloc.hugetlb=1`` still saves about 5% of the CPU time of the
loss's forward and backward (fewer TLB misses); it must be set before the process starts, so the
command does not re-exec itself for it (by then ``import wordystore`` has cost 1.4 s of imports
that a re-exec repeats): ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1 wordystore train ...`` adds it.

The numbers computed are unchanged: only where the memory comes from changes, and every tensor is
written before it is read (``tests/test_trainer.py`` checks a run with and without it bit for bit).
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Make this process's malloc reuse freed memory instead of unmapping it; True if it could.

    Process-wide and not undone: the ``wordystore train`` command calls it (``--low-memory``
    skips it). On other C libraries than glibc it does nothing and returns False.

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
