"""``python -m bench --device cuda``: the write path at the speed of a GPU, every figure against a
baseline measured in the same run, written to ``bench/results/gpu.md`` (``gpu-quick.md`` with
``--quick``). One script runs everything, each section on its own (a section that fails is a row
saying so, and the others still run):

1. the GPU tests (tests/test_gpu.py: the ordering of the asynchronous copies, the pinned ring);
2. recording against no recording in one process, the seed run (200 steps; 40 with ``--quick``),
   with the writer's pools in a child process (the default with a GPU) and beside training
   (``WORDYSTORE_WRITER_PROCESS=0``): steps/s and the close after the last step;
3. the main job against the notebook's own code path, whole processes (bench/trainer_bench.py);
4. writer-only ingest rows/s and compaction MB/s by thread count, on the rows of the run recorded
   in 2; the hot codec; the GIL a Python-bound loop loses per recorded row;
5. export MB/s by thread count, against a plain file write of the same size;
6. reads of the untrained slice by reader threads, and the serial part of a read (the GIL held)
   with the speed-up it allows at 16 threads (Amdahl).

docs/targets.md says how to bring the wheels a GPU machine lacks and run it there.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from bench import writer_bench
from bench.gil import read_serial_part, untrained_read
from bench.recording_job import recording_runs
from bench.table import row, write_results

ROOT = Path(__file__).resolve().parents[1]


def threads_to_try(quick: bool) -> list[int]:
    cores = len(os.sched_getaffinity(0))
    return [n for n in ((1, 4) if quick else (1, 2, 4, 8, 16)) if n <= cores] or [1]


def section(title: str, work) -> None:
    """Run one section; a failure becomes a row (the other sections still run)."""
    print(f"\n{title}", flush=True)
    try:
        work()
    except Exception as exc:  # the table says what failed; the traceback goes to the log
        traceback.print_exc()
        row(title, "failed", "-", f"{type(exc).__name__}: {exc}"[:200], "-")


def gpu_tests() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "tests/test_gpu.py"], cwd=ROOT, capture_output=True, text=True
    )
    summary = (done.stdout.strip().splitlines() or ["no output"])[-1]
    row(
        "gpu tests",
        "tests/test_gpu.py: stored rows equal synchronous snapshots; the ring is pinned",
        "-",
        summary,
        "-",
        "all pass",
        done.returncode == 0,
    )


def recording(steps: int, tmp: Path, keep: dict) -> None:
    """Recording against no recording in one process, the pools in a child process, then beside
    training; the first recorded store is kept for the sections after."""
    for label, env in (("pools in a child process", "1"), ("pools beside training", "0")):
        os.environ["WORDYSTORE_WRITER_PROCESS"] = env
        try:
            none, recorded = recording_runs(
                ["none", "recording"], {"steps": steps, "device": "cuda"}, tmp / f"run-{env}"
            )
        finally:
            del os.environ["WORDYSTORE_WRITER_PROCESS"]
        ratio = recorded["steps_per_s"] / none["steps_per_s"]
        row(
            "recording",
            f"steps/s, steps 3..{steps}, one process ({label})",
            f"{none['steps_per_s']:.1f} (no recording)",
            f"{recorded['steps_per_s']:.1f}",
            f"{ratio:.2f}x",
            ">= 0.9x",
            ratio >= 0.9,
        )
        row(
            "recording",
            f"close after the last step ({label})",
            "3 s (target)",
            f"{recorded['close_s']:.1f} s",
            f"{recorded['close_s'] / 3:.0%}",
            "<= 3 s",
            recorded["close_s"] <= 3,
        )
        keep.setdefault("store", tmp / f"run-{env}.recording")


def main_job(steps: int) -> None:
    from bench.trainer_bench import medians, side_by_side

    middle = medians(side_by_side(steps, 1))
    nb, ws = middle["notebook"], middle["wordystore"]
    row(
        "main job",
        f"seed job, {steps} steps, whole processes",
        f"{nb['wall_s']:.1f} s (notebook)",
        f"{ws['wall_s']:.1f} s",
        f"{ws['wall_s'] / nb['wall_s']:.2f}x the notebook's time",
        "<= 0.8x",
        ws["wall_s"] <= 0.8 * nb["wall_s"],
    )
    row(
        "main job",
        "peak RSS",
        f"{nb['peak_rss_gb']:.2f} GB (notebook)",
        f"{ws['peak_rss_gb']:.2f} GB",
        f"{ws['peak_rss_gb'] / nb['peak_rss_gb']:.2f}x",
    )


def writer(store: Path, threads: list[int], tmp: Path) -> None:
    import wordystore

    rows = writer_bench.recorded_rows(store, 33)
    vocab, dim = wordystore.open(store, cache_bytes=0).kinds["embeddings"].shape
    r = writer_bench.measure(rows, threads, vocab, dim, tmp)
    one_in, one_c = r["ingest"][1]["rows_per_s"], r["compaction"][1]["mb_per_s"]
    for n in threads[1:]:
        many = r["ingest"][n]["rows_per_s"]
        row(
            "writer",
            f"writer-only ingest ({r['row_mb']:.0f} MB rows from memory), {n} write threads",
            f"{one_in:.1f} rows/s (1 thread)",
            f"{many:.1f} rows/s ({many * r['row_mb'] / 1e3:.2f} GB/s)",
            f"{many / one_in:.2f}x",
        )
        many = r["compaction"][n]["mb_per_s"]
        row(
            "writer",
            f"compaction, {n} threads",
            f"{one_c:,.0f} MB/s (1 thread)",
            f"{many:,.0f} MB/s",
            f"{many / one_c:.2f}x",
        )
    raw, lz4 = r["hot_codecs"]["raw"], r["hot_codecs"]["lz4"]
    row(
        "writer",
        "hot tier, 1 thread: raw bytes + crc32c",
        f"{lz4:.1f} rows/s (blosc lz4)",
        f"{raw:.1f} rows/s",
        f"{raw / lz4:.2f}x",
    )
    step_ms = writer_bench.GPU_STEP_S * 1e3
    for label, key in (("pools beside training", "gil_threads_ms"), ("pools in a child process", "gil_process_ms")):
        row(
            "writer",
            f"GIL a Python-bound loop loses per recorded row, {label}",
            f"{step_ms:.1f} ms (a GPU step: a constant, not measured in this run)",
            f"{r[key]:.2f} ms",
            f"{r[key] / step_ms:.0%} of a step",
            "<= 10%",
            r[key] <= 0.1 * step_ms,
        )


def export(store: Path, threads: list[int], tmp: Path) -> None:
    from wordystore.tools import safetensors_layout

    out = tmp / "export.safetensors"
    rates = {}
    for n in threads:
        began = time.perf_counter()
        safetensors_layout.export(store, out, threads=n, progress=False, overwrite=True)
        rates[n] = out.stat().st_size / (time.perf_counter() - began)
    size = out.stat().st_size
    out.unlink()
    blob = np.ones(64 << 20, np.uint8)
    began = time.perf_counter()
    with open(tmp / "plain", "wb") as f:
        for _ in range(max(1, size // blob.nbytes)):
            f.write(blob)
    plain = max(1, size // blob.nbytes) * blob.nbytes / (time.perf_counter() - began)
    (tmp / "plain").unlink()
    for n, rate in rates.items():
        target = n == max(threads) and n >= 16
        row(
            "export",
            f"export to the seed layout, {n} threads: MB/s",
            f"{plain / 1e6:,.0f} MB/s (plain file write)",
            f"{rate / 1e6:,.0f} MB/s",
            f"{rate / plain:.0%} of a plain write",
            ">= 1,000 MB/s" if target else "",
            rate >= 1e9 if target else None,
        )


def reads(store: Path, threads: list[int]) -> None:
    serial, one = read_serial_part(store)
    for n in threads:
        reader, read = untrained_read(store, n)
        seconds = min(_timed(read) for _ in range(2))
        reader.close()
        if n == 1:
            base = seconds
        target = n == max(threads) and n >= 16
        row(
            "reads",
            f"untrained slice, all steps, {n} reader threads",
            f"{base * 1e3:,.0f} ms (1 thread)",
            f"{seconds * 1e3:,.0f} ms",
            f"{base / seconds:.1f}x",
            ">= 10x" if target else "",
            base / seconds >= 10 if target else None,
        )
    bound = 1 / (serial + (1 - serial) / 16)
    row(
        "reads",
        "serial part of a read at 1 thread (GIL held), and the 16-thread speed-up it allows",
        f"{one * 1e3:,.0f} ms (the read)",
        f"{serial:.1%} serial",
        f"<= {bound:.1f}x at 16 threads (Amdahl)",
    )


def _timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def store_sections(store: Path, threads: list[int], tmp: Path) -> None:
    """The sections over a recorded store (they need no GPU: tests/test_bench.py runs them on CPU)."""
    section("writer", lambda: writer(store, threads, tmp))
    section("export", lambda: export(store, threads, tmp))
    section("reads", lambda: reads(store, threads))


def run(quick: bool) -> Path:
    """Every section; returns the results file."""
    steps = 40 if quick else 200
    threads = threads_to_try(quick)
    header = (
        f"`python -m bench --device cuda{' --quick' if quick else ''}` on {torch.cuda.get_device_name(0)}, "
        f"{len(os.sched_getaffinity(0))} cores, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"Python {platform.python_version()}"
    )
    print(header, flush=True)
    keep: dict = {}
    with tempfile.TemporaryDirectory(prefix="wordystore-gpu-bench-") as tmp:
        tmp = Path(tmp)
        section("gpu tests", gpu_tests)
        section("recording", lambda: recording(steps, tmp, keep))
        section("main job", lambda: main_job(steps))
        if "store" in keep:
            store_sections(keep["store"], threads, tmp)
        path = write_results("gpu-quick" if quick else "gpu", header)
    print(json.dumps({"results": str(path)}))
    return path
