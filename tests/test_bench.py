"""`python -m bench --quick` runs every measurement end to end (timings are not asserted: they are
ratios for a person to read, measured against baselines in the same run)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_quick_benchmark_measures_every_row(tmp_path):
    env = {**os.environ, "WORDYSTORE_BENCH_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "bench", "--quick"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (ROOT / "bench" / "results" / "quick.md").read_text()
    for measure in ("bytes on disk, compact profile", "untrained slice, all steps", "one token, all steps",
                    "one step", "through the chunk cache", "iterate over all steps", "read efficiency",
                    "tensorstore", "export to the seed layout", "import: peak RSS", "median step time",
                    "writer's extra peak RSS", "compaction and close", "seed job", "CPU class",
                    "quick step: float32 against native", "quick step: auto (picks", "imported seed file",
                    "bytes on disk, archive profile", "untrained slice, archive profile"):
        assert measure in table, measure
    assert not list(tmp_path.glob("wordystore-bench-*"))  # its scratch space is cleaned up
