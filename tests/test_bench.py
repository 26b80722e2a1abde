"""`python -m bench --quick` runs every measurement end to end (timings are not asserted: they are
ratios for a person to read, measured against baselines in the same run)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_the_quick_benchmark_measures_every_row(tmp_path):
    env = {**os.environ, "WORDYSTORE_BENCH_CACHE": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = (ROOT / "bench" / "results" / "quick.md").read_text()
    for measure in (
        "bytes on disk, compact profile",
        "untrained slice, all steps",
        "one token, all steps",
        "one step",
        "through the chunk cache",
        "iterate over all steps",
        "read efficiency",
        "tensorstore",
        "export to the seed layout",
        "import: peak RSS",
        "training time, steps 3..",
        "writer's extra peak RSS",
        "close after the last step",
        "seed job",
        "CPU class",
        "quick step: float32 against native",
        "quick step: auto (picks",
        "imported seed file",
        "bytes on disk, archive profile",
        "untrained slice, archive profile",
        "writer-only ingest",
        "compaction of those rows",
        "hot tier, 1 thread",
        "GIL a Python-bound loop loses per recorded row, pools beside training",
        "GIL a Python-bound loop loses per recorded row, pools in a child process",
        "serial part (GIL held)",
        "whole main job, steps 3..",
        "core-seconds recording adds to the main job beyond the codec's own encode",
        "a plain PyTorch loop of the seed model",
        "writer fed those rows from memory",
    ):
        assert measure in table, measure
    assert not list(tmp_path.glob("wordystore-bench-*"))  # its scratch space is cleaned up

    # the codec table, on the same (cached) quick store
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--codecs", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    codecs = (ROOT / "bench" / "results" / "codecs-quick.md").read_text()
    for measure in ("| grads | pcodec level 8 |", "| momentum | blosc zstd 1, bit shuffle |", "byte planes, zstd 1"):
        assert measure in codecs, measure

    # The GPU table's sections over a recorded store need no GPU: they run here on the quick store.
    script = (
        "import sys; from pathlib import Path; from bench import gpu_bench, table; "
        "gpu_bench.store_sections(Path(sys.argv[1]), [1, 2], Path(sys.argv[2])); "
        "print([r[:2] for r in table.ROWS if r[1] == 'failed'])"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "quick" / "wb1b.zarr"), str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "[]", (
        done.stdout[-3000:] + done.stderr[-3000:]
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here: the GPU table would run")
def test_the_gpu_table_refuses_clearly_without_a_gpu():
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--device", "cuda"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("python -m bench: error: --device cuda needs a CUDA GPU")
