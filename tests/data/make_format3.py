"""Writes the format-3 store under tests/data/format3/ (kept in the repository: format 3 can no
longer be written). It was made at commit fa4e2b9, the last to write format 3 (before the decoding
parameters were bound to each shard), with:

    python tests/data/make_format3.py tests/data/format3

``compact.zarr`` holds the rows, token sets and resume state of the format-2 stores
(tests/data/make_format2.py: ``rows(STEPS)``), every row compacted.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import make_format2  # noqa: E402 - the same rows, token sets and state

if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    make_format2.write(out / "compact.zarr", "compact")
    for lock in out.glob("*.zarr/.wordystore-writer.lock"):
        lock.unlink()
