"""A process that only writes: its peak RSS over what it held before creating the writer, for
``ROWS`` rows of seed-shaped kinds (the ring, the block thread, compaction and close). Prints one
JSON line, ``{"extra_mb": ...}``; ``python -m bench`` runs it as a whole process.

    python -m bench.writer_memory_job OUT ROWS VOCAB DIM
"""

from __future__ import annotations

import json
import sys

import psutil
import torch

import wordystore


def main() -> None:
    out, rows, vocab, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    kinds = wordystore.seed_kinds(vocab, dim)
    step = {name: torch.randn(kind.shape).to(kind.torch_dtype) if kind.shape else 0.5 for name, kind in kinds.items()}
    baseline = psutil.Process().memory_info().rss
    with wordystore.create(out, kinds) as w:
        for row in range(rows):
            step["embeddings"][row % vocab] += 1  # the rows differ a little, as a trajectory's do
            w.append(row, **step)
    # VmHWM is this address space's own peak; ru_maxrss would include the parent's, inherited at fork
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))
    print(json.dumps({"extra_mb": (peak - baseline) / 1e6}))


if __name__ == "__main__":
    main()
