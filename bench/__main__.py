"""wordystore's benchmark: one table in which every figure is a ratio against a baseline measured in
the same run, on the seed's 200-step run (trained once, then cached with its exports).

    python -m bench               # the real 200-step seed run (first time: trains it, ~8 minutes)
    python -m bench --quick       # every measurement on a small run (8,192-token vocabulary), for CI (about 2 minutes)
    python -m bench --store runs/wb1b.zarr   # measure a trajectory you already have
    python -m bench --scale [--quick]        # object storage, writer processes, a cluster (bench/scale.py)
    python -m bench --codecs [--quick]       # the codec table: size against encode core-seconds (bench/codec_table.py)
    python -m bench --device cuda [--quick]  # the GPU table instead (bench/gpu_bench.py; docs/targets.md)
    python -m bench --write-docs             # the docs' marked tables from the latest full run

Baselines: the seed notebook's single safetensors file of the same run (size, reads warm and cold,
read through safetensors' own lazy slices), tensorstore reading the same portable arrays, the
codec's own multi-threaded decode of the same chunks, the machine's plain file write and read
speed, the same training steps without recording, and the notebook's own code path for the main
job (bench/trainer_bench.py). The ``writer`` rows are the write path alone (bench/writer_bench.py):
a writer fed the store's rows from memory by write threads, compaction by threads, the hot codec,
and the GIL a Python-bound loop (a GPU's training loop) loses per recorded row. Results also go to
bench/results/: a full run's rows to latest.json, which git keeps and from
which ``--write-docs`` writes the docs' tables; ``--quick`` to quick.json, ``--skip-training`` to
partial.json.

The first row is the CPU's class as ``--bf16-matmul auto`` sees it; the numerics rows time a step of
each matmul choice side by side. ``WORDYSTORE_CPU_BF16=0`` (or ``=1``) makes auto see a CPU without
(with) bf16 units, so auto's side of another CPU class runs here; the kernels stay this machine's,
so native's time is still this CPU's (the row says so).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil

from bench import docs_tables
from bench.table import row, write_results

CACHE = Path(os.environ.get("WORDYSTORE_BENCH_CACHE", Path.home() / ".cache" / "wordystore" / "bench"))
QUICK_RUN = ["--steps", "40", "--vocab-size", "8192", "--hidden-dim", "16", "--batch-size", "4", "--max-seq-len", "32"]


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "wordystore.cli", *map(str, args)], check=True, **kwargs)


def measured(argv: list[str], env=None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB, polled every 20 ms) of a child process."""
    start = time.perf_counter()
    proc = psutil.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    if proc.returncode:
        raise RuntimeError(f"{argv} failed: {proc.stderr.read().decode()[-2000:]}")
    return time.perf_counter() - start, peak / 1e6


def evict(path: Path) -> None:
    """Drop a file's or a directory's files from the page cache (cold reads)."""
    for p in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def best(fn, repeat: int, before=None) -> float:
    times = []
    for _ in range(repeat):
        if before:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def prepare(ns) -> tuple[Path, Path, Path]:
    """The run's compact store, its portable conversion and its seed-layout file (made once, cached)."""
    base = CACHE / ("quick" if ns.quick else "seed-200")
    store = Path(ns.store) if ns.store else base / "wb1b.zarr"
    if not ns.store and not (store / "commit.json").exists():
        print(f"training the {'quick' if ns.quick else 'seed 200-step'} run into {store} (cached for later runs)")
        cli("train", store, "--quiet", "--overwrite", *(QUICK_RUN if ns.quick else []))
    portable, seed = store.with_name(store.stem + "-portable.zarr"), store.with_name(store.stem + ".safetensors")
    if not (portable / "commit.json").exists():
        cli("convert", store, portable, "--profile", "portable", "--overwrite", stdout=subprocess.DEVNULL)
    if not seed.exists():
        cli("export", store, seed, stdout=subprocess.DEVNULL)
    return store, portable, seed


def store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench_size(store: Path, portable: Path, seed: Path) -> None:
    file_bytes = seed.stat().st_size
    for label, path, target in (("compact", store, 7.2), ("portable", portable, None)):
        ratio = file_bytes / store_bytes(path)
        row(
            "size",
            f"bytes on disk, {label} profile",
            f"{file_bytes / 1e6:,.0f} MB (seed file)",
            f"{store_bytes(path) / 1e6:,.0f} MB",
            f"{ratio:.2f}x smaller",
            f">= {target}x" if target else "",
            ratio >= target if target else None,
        )


def bench_archive(store: Path, seed: Path, quick: bool) -> None:
    """Issue 15's sizes: the seed file imported (moments predicted), the run in the archive profile,
    and the archive's untrained-slice read against the compact profile's, in this run."""
    import wordystore

    archive = store.with_name(store.stem + "-archive.zarr")
    if not (archive / "commit.json").exists():
        cli("convert", store, archive, "--profile", "archive", "--overwrite", "--quiet", stdout=subprocess.DEVNULL)
    tmp = Path(tempfile.mkdtemp(prefix="wordystore-bench-", dir=CACHE))
    file_bytes = seed.stat().st_size
    try:
        cli("import", seed, tmp / "imported.zarr", "--quiet", stdout=subprocess.DEVNULL)
        chosen = wordystore.open(tmp / "imported.zarr").config["import_prediction"]["chosen"]
        for label, path, target in (
            (f"imported seed file ({chosen} prediction)", tmp / "imported.zarr", 7.6),
            ("archive profile", archive, 9.7),
        ):
            ratio = file_bytes / store_bytes(path)
            row(
                "size",
                f"bytes on disk, {label}",
                f"{file_bytes / 1e6:,.0f} MB (seed file)",
                f"{store_bytes(path) / 1e6:,.0f} MB",
                f"{ratio:.2f}x smaller",
                f">= {target}x",
                ratio >= target,
            )
    finally:
        subprocess.run(["rm", "-rf", str(tmp)], check=True)
    reads = {}
    for label, path in (("compact", store), ("archive", archive)):
        t = wordystore.open(path, cache_bytes=0)
        reads[label] = best(lambda: t.embeddings[0 : len(t), "untrained"], 1 if quick else 3)
    ratio = reads["archive"] / reads["compact"]
    row(
        "read, warm page cache",
        "untrained slice, archive profile",
        f"{reads['compact'] * 1e3:,.0f} ms (compact)",
        f"{reads['archive'] * 1e3:,.0f} ms",
        f"{ratio:.2f}x the compact profile's time",
        "<= 2x",
        ratio <= 2,
    )


def bench_reads(store: Path, portable: Path, seed: Path, quick: bool) -> None:
    """The canonical reads of embeddings against the seed file, warm and cold, cached, iterated."""
    import torch
    from safetensors import safe_open

    import wordystore

    t = wordystore.open(store, cache_bytes=0)
    rows, untrained = len(t), torch.from_numpy(t.token_set("untrained"))
    mid, repeat = rows // 2, 2 if quick else 3

    def from_file(index, copy):  # opened anew each time: pages a live mmap holds cannot be evicted
        def read():
            with safe_open(str(seed), "pt") as f:
                out = f.get_slice("embeddings")[index[0]][index[1]]
                return out.clone() if copy else out

        return read

    cases = {
        "untrained slice, all steps": (
            from_file((slice(0, rows), (slice(None), untrained)), False),
            lambda: t.embeddings[0:rows, "untrained"],
            2.5,
            None,
        ),
        "one token, all steps": (
            from_file((slice(None), (slice(None), slice(1234, 1235))), True),
            lambda: t.embeddings[:, 1234],
            None,
            0.010,
        ),
        "one step": (from_file((slice(mid, mid + 1), slice(None)), True), lambda: t.embeddings[mid], None, 0.250),
    }
    untrained_seconds = None
    for label, (file_read, store_read, warm_ratio, seconds) in cases.items():
        assert torch.equal(file_read().squeeze().view(torch.int16), store_read().squeeze().view(torch.int16)), label
        for cache in ("warm", "cold"):
            evicting = cache == "cold"
            a = best(file_read, repeat, (lambda: evict(seed)) if evicting else None)
            b = best(store_read, repeat, (lambda: evict(store)) if evicting else None)
            if label.startswith("untrained") and cache == "warm":
                untrained_seconds = b
            if warm_ratio and cache == "warm":
                target, met = f"<= {warm_ratio}x the file", b / a <= warm_ratio
            elif label.startswith("untrained"):
                target, met = "faster than the file", b < a
            elif seconds:
                target, met = f"<= {seconds * 1e3:.0f} ms", b <= seconds
            else:
                target, met = "", None
            row(
                f"read, {cache} page cache",
                label,
                f"{a * 1e3:,.1f} ms (file)",
                f"{b * 1e3:,.1f} ms",
                f"{b / a:.2f}x the file's time",
                target,
                met,
            )

    cached = wordystore.open(store)
    cached.embeddings[0:rows, "untrained"]  # fills the chunk cache
    a, b = (
        best(cases["untrained slice, all steps"][0], repeat),
        best(lambda: cached.embeddings[0:rows, "untrained"], repeat),
    )
    row(
        "read, repeated",
        "untrained slice through the chunk cache",
        f"{a * 1e3:,.1f} ms (file, warm)",
        f"{b * 1e3:,.1f} ms",
        f"{b / a:.2f}x",
        "no slower than the file warm",
        b <= a,
    )
    cached.close()

    def iterate():
        for _ in wordystore.open(store, cache_bytes=0).embeddings:
            pass

    it = best(iterate, 1 if not quick else 1)
    row(
        "read, warm page cache",
        "iterate over all steps in order",
        f"{untrained_seconds * 1e3:,.0f} ms (untrained slice)",
        f"{it * 1e3:,.0f} ms",
        f"{it / untrained_seconds:.2f}x",
        "<= 1.5x the untrained slice",
        it <= 1.5 * untrained_seconds,
    )


def bench_read_threads(store: Path) -> None:
    """The serial part of the untrained read (the GIL its one thread holds) and the speed-up it
    allows 16 threads (Amdahl), where this machine cannot run 16 (the GPU table times them). A bound,
    not a measurement, and the probe slows the read it measures: the row states no target as met."""
    from bench.gil import read_serial_part

    serial, seconds = read_serial_part(store)
    bound = 1 / (serial + (1 - serial) / 16)
    row(
        "read scaling",
        "untrained slice on 1 reader thread: serial part (GIL held)",
        f"{seconds * 1e3:,.0f} ms (the read, slowed by the probe)",
        f"{serial:.1%} serial",
        f"<= {bound:.1f}x at 16 threads (Amdahl bound, not measured)",
        ">= 10x measured on 16 threads (python -m bench --device cuda)",
    )


def bench_peer(portable: Path, quick: bool) -> None:
    """wordystore against tensorstore on the same portable arrays."""
    try:
        import tensorstore as ts
    except ImportError:
        row("peer", "tensorstore", "not installed", "-", "-")
        return
    import wordystore

    t = wordystore.open(portable, cache_bytes=0)
    rows, untrained, mid = len(t), t.token_set("untrained"), len(t) // 2
    array = ts.open(
        {
            "driver": "zarr3",
            "kvstore": {"driver": "file", "path": str(portable / "embeddings")},
            "context": {"cache_pool": {"total_bytes_limit": 0}},
        }
    ).result()
    cases = {
        "untrained slice, all steps": (
            lambda: array.oindex[0:rows, untrained].read().result(),
            lambda: t.embeddings.numpy((slice(0, rows), "untrained")),
        ),
        "one token, all steps": (
            lambda: array[:, 1234].read().result(),
            lambda: t.embeddings.numpy((slice(None), 1234)),
        ),
        "one step": (lambda: array[mid].read().result(), lambda: t.embeddings.numpy(mid)),
    }
    for label, (theirs, ours) in cases.items():
        assert np.array_equal(np.asarray(theirs()).view(np.uint16), ours().view(np.uint16)), label
        a, b = best(theirs, 2 if quick else 3), best(ours, 2 if quick else 3)
        row(
            "peer (portable profile)",
            label,
            f"{a * 1e3:,.1f} ms (tensorstore)",
            f"{b * 1e3:,.1f} ms",
            f"{b / a:.2f}x tensorstore's time",
            "<= 1x",
            b <= a,
        )


def bench_efficiency(store: Path) -> None:
    """Bytes decoded per second by the untrained read against the codec's own multi-threaded decode
    of the same chunks (compressed bytes already in memory, no copying into an output). The read
    goes into an output already written once: a fresh one costs the same page faults whatever
    fills it (the read rows above include them, for the file and the store alike)."""
    import wordystore
    from wordystore.format.codecs import ShardIndex
    from wordystore.store import storage

    t = wordystore.open(store, cache_bytes=0)
    layout = t.layouts["embeddings"][0]
    n_chunks = int(np.prod(layout.chunks_per_shard))
    chunks = []
    for coords in np.ndindex(*layout.shard_grid()):
        data = storage.get(t.store, layout.shard_key(coords))
        index = ShardIndex.decode(data[-ShardIndex.nbytes(n_chunks) :], n_chunks)
        chunks += [data[start:end] for start, end in filter(None, map(index.span, range(n_chunks)))]
    stored_shape = layout.codecs.stored_shape(layout.chunk)

    def decode_all(part):
        buffer = np.empty(stored_shape, layout.numpy_dtype)
        for data in part:
            layout.codecs.decode_into(data, buffer)

    threads = os.cpu_count() or 1
    parts = [chunks[i::threads] for i in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        seconds = best(lambda: list(pool.map(decode_all, parts)), 2)
    decoded = len(chunks) * int(np.prod(stored_shape)) * layout.numpy_dtype.itemsize
    ids = t.token_set("untrained")
    out = np.zeros((len(t), len(ids), *t.kinds["embeddings"].shape[1:]), t.kinds["embeddings"].numpy_dtype)
    fetch = (slice(0, len(t), 1), ids, *(slice(0, n, 1) for n in out.shape[2:]))
    read_seconds = best(lambda: t.read_into("embeddings", fetch, out), 2)
    codec_rate, read_rate = decoded / seconds, decoded / read_seconds
    row(
        "read efficiency",
        f"untrained slice: bytes decoded per second ({threads} threads)",
        f"{codec_rate / 1e6:,.0f} MB/s (codec alone)",
        f"{read_rate / 1e6:,.0f} MB/s",
        f"{read_rate / codec_rate:.0%} of the codec",
        ">= 80%",
        read_rate >= 0.8 * codec_rate,
    )


def bench_export_import(store: Path, seed: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="wordystore-bench-", dir=CACHE))
    size = seed.stat().st_size
    try:
        blob = np.ones(64 << 20, np.uint8)

        def plain_write():
            with open(tmp / "plain", "wb") as f:
                for _ in range(max(1, size // blob.nbytes)):
                    f.write(blob)

        write_s = best(plain_write, 1) * size / (max(1, size // blob.nbytes) * blob.nbytes)
        (tmp / "plain").unlink()
        evict(seed)
        read_s = best(lambda: subprocess.run(["cat", str(seed)], stdout=subprocess.DEVNULL, check=True), 1)
        export_s, export_rss = measured(
            [sys.executable, "-m", "wordystore.cli", "export", str(store), str(tmp / "x.safetensors")]
        )
        row(
            "export/import",
            "export to the seed layout: MB/s",
            f"{size / write_s / 1e6:,.0f} MB/s (plain file write)",
            f"{size / export_s / 1e6:,.0f} MB/s",
            f"{write_s / export_s:.0%} of a plain write",
            ">= 80% of a plain write",
            write_s / export_s >= 0.8,
        )
        row(
            "export/import",
            "export: peak RSS",
            "512 MB (budget)",
            f"{export_rss:,.0f} MB",
            f"{export_rss / 512:.0%}",
            "<= 512 MB",
            export_rss <= 512,
        )
        (tmp / "x.safetensors").unlink()
        import_s, import_rss = measured(
            [sys.executable, "-m", "wordystore.cli", "import", str(seed), str(tmp / "i.zarr")]
        )
        row(
            "export/import",
            "import from the seed layout: MB/s",
            f"{size / read_s / 1e6:,.0f} MB/s (plain file read, cold)",
            f"{size / import_s / 1e6:,.0f} MB/s",
            f"{read_s / import_s:.0%} of a plain read",
            ">= 300 MB/s",
            size / import_s >= 300e6,
        )
        row(
            "export/import",
            "import: peak RSS",
            "512 MB (budget)",
            f"{import_rss:,.0f} MB",
            f"{import_rss / 512:.0%}",
            "<= 512 MB",
            import_rss <= 512,
        )
    finally:
        subprocess.run(["rm", "-rf", str(tmp)], check=True)


def bench_recording(quick: bool) -> None:
    """The seed run with and without recording, each a whole process (alternating with ``--quick``'s
    repeats): the training time after the first two steps, and the close after the last step. The
    full bench runs all 200 steps: compaction keeps pace through the whole run, or does not."""
    from bench.recording_job import recording_runs

    args = (
        {"steps": 200}
        if not quick
        else {"steps": 10, "vocab_size": 8192, "hidden_dim": 16, "batch_size": 4, "max_seq_len": 32}
    )
    results = {"none": [], "recording": []}
    tmp = Path(tempfile.mkdtemp(prefix="wordystore-bench-", dir=CACHE))
    try:
        for mode in results:
            results[mode] += recording_runs([mode], args, tmp)
    finally:
        subprocess.run(["rm", "-rf", str(tmp)], check=True)
    train = {mode: float(np.median([r["train_s"] for r in rs])) for mode, rs in results.items()}
    overhead = train["recording"] / train["none"] - 1
    row(
        "recording",
        f"training time, steps 3..{args['steps']} (whole processes)",
        f"{train['none']:.1f} s (no recording)",
        f"{train['recording']:.1f} s",
        f"{overhead:+.1%}",
        "<= +3%",
        overhead <= 0.03,
    )
    closing = float(np.median([r["close_s"] for r in results["recording"]]))
    row(
        "recording",
        "close after the last step (the last partial chunk)",
        f"{train['none']:.1f} s (training)",
        f"{closing:.1f} s",
        f"{closing / train['none']:.0%} of the training time",
        "<= 3 s" if not quick else "",
        closing <= 3 if not quick else None,
    )
    whole = (train["recording"] + closing) / train["none"]
    row(
        "recording",
        f"whole main job, steps 3..{args['steps']} and close, with recording (default profile)",
        f"{train['none']:.1f} s (the same steps, no recording)",
        f"{train['recording'] + closing:.1f} s",
        f"{whole:.2f}x",
        "<= 1.15x",
        whole <= 1.15,
    )
    return {mode: float(np.median([r["cpu_s"] for r in rs])) for mode, rs in results.items()}, args["steps"]


def bench_recording_cost(store: Path, cpu: dict[str, float], steps: int) -> None:
    """What recording adds to the main job in core-seconds (training process and writer process,
    close included) against the compact codec's own encode time of the same rows (one thread,
    pcodec level 8, on the store's rows: bench/codec_table.py)."""
    from bench import codec_table

    encode = codec_table.encode_seconds_per_row(store) * steps
    extra = cpu["recording"] - cpu["none"]
    beyond = (extra - encode) / encode
    row(
        "recording",
        f"core-seconds recording adds to the main job beyond the codec's own encode, {steps} rows",
        f"{encode:.1f} core-s (pcodec level 8 alone, one thread)",
        f"{extra:.1f} core-s (recording's whole extra)",
        f"{beyond:+.2f}x the encode time beyond it",
        "<= 0.25x",
        beyond <= 0.25,
    )


def bench_writer(store: Path, quick: bool) -> None:
    """The CPU proxy of recording at GPU speed (bench/writer_bench.py): a writer fed the store's
    rows from memory as fast as it takes them, by thread count; compaction of the same rows by
    thread count; the hot codec; the GIL a Python-bound loop loses per recorded row."""
    from bench import writer_bench

    rows = writer_bench.recorded_rows(store, 33)  # a chunk of rows to compact, and one more
    kind = wordystore_kind(store, "embeddings")
    tmp = Path(tempfile.mkdtemp(prefix="wordystore-bench-", dir=CACHE))
    try:
        r = writer_bench.measure(rows, [1, 2], kind.shape[0], kind.shape[1], tmp)
    finally:
        subprocess.run(["rm", "-rf", str(tmp)], check=True)
    one, two = r["ingest"][1]["rows_per_s"], r["ingest"][2]["rows_per_s"]
    row(
        "writer",
        f"writer-only ingest, {len(rows)} rows of {r['row_mb']:.1f} MB from memory: rows/s, 2 write threads",
        f"{one:.1f} rows/s (1 thread)",
        f"{two:.1f} rows/s",
        f"{two / one:.2f}x",
        ">= 1.8x",
        two / one >= 1.8,
    )
    one, two = r["compaction"][1]["mb_per_s"], r["compaction"][2]["mb_per_s"]
    row(
        "writer",
        "compaction of those rows: MB/s, 2 threads",
        f"{one:,.0f} MB/s (1 thread)",
        f"{two:,.0f} MB/s",
        f"{two / one:.2f}x",
        ">= 1.8x",
        two / one >= 1.8,
    )
    raw, lz4 = r["hot_codecs"]["raw"], r["hot_codecs"]["lz4"]
    row(
        "writer",
        "hot tier, 1 thread: rows/s encoded, stored, fsynced (raw bytes + crc32c)",
        f"{lz4:.1f} rows/s (blosc lz4)",
        f"{raw:.1f} rows/s",
        f"{raw / lz4:.2f}x",
    )
    fed, lz4 = r["fed_rows_per_s"], r["lz4_rows_per_s"]
    row(
        "writer",
        "writer fed those rows from memory, default pools, both cores: rows/s, first append to close",
        f"{lz4:.1f} rows/s (blosc lz4 alone, 2 threads)",
        f"{fed:.1f} rows/s",
        f"{fed / lz4:.2f}x",
        ">= 0.5x",
        fed / lz4 >= 0.5,
    )
    step_ms = writer_bench.GPU_STEP_S * 1e3
    for label, key in (("pools beside training", "gil_threads_ms"), ("pools in a child process", "gil_process_ms")):
        lost = r[key]
        row(
            "writer",
            f"GIL a Python-bound loop loses per recorded row, {label}",
            f"{step_ms:.1f} ms (a GPU step: a constant, not measured in this run)",
            f"{lost:.2f} ms",
            f"{lost / step_ms:.0%} of a step",
            "<= 10%",
            lost <= 0.1 * step_ms,
        )


def bench_plain_loop(quick: bool) -> None:
    """A plain PyTorch loop of the seed model (AdamW, clipping at 1.0) recording every step through
    ``wordystore.create`` with Adam predictions, against the same loop without: whole processes,
    alternating, the best of two each; steps 3.. and the writer's close."""
    args = (
        {"steps": 96, "vocab_size": 50257}
        if not quick
        else {"steps": 10, "vocab_size": 8192, "hidden_dim": 16, "batch_size": 4, "max_seq_len": 32}
    )
    seconds = {"none": [], "recording": []}
    tmp = Path(tempfile.mkdtemp(prefix="wordystore-bench-", dir=CACHE))
    try:
        for _ in range(1 if quick else 2):
            for mode in seconds:
                out = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "bench.plain_loop_job",
                        mode,
                        str(tmp / f"{mode}.zarr"),
                        json.dumps(args),
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                seconds[mode].append(json.loads(out.strip().splitlines()[-1])["seconds"])
                subprocess.run(["rm", "-rf", str(tmp / f"{mode}.zarr")], check=True)
    finally:
        subprocess.run(["rm", "-rf", str(tmp)], check=True)
    none, recording = min(seconds["none"]), min(seconds["recording"])
    row(
        "recording",
        f"a plain PyTorch loop of the seed model, steps 3..{args['steps']}, recording through wordystore.create",
        f"{none:.1f} s (the same loop, no recording)",
        f"{recording:.1f} s",
        f"{recording / none:.2f}x",
        "<= 1.08x",
        recording / none <= 1.08,
    )


def wordystore_kind(store: Path, name: str):
    import wordystore

    return wordystore.open(store, cache_bytes=0).kinds[name]


def bench_numerics(quick: bool) -> None:
    """A training step of each ``--bf16-matmul`` choice, side by side (whole processes, no recording):
    native against float32, and auto (whatever it picks here) against float32."""
    from bench.recording_job import recording_runs
    from trainer import numerics

    cpu = numerics.cpu()
    args = {"steps": 8} if not quick else {"steps": 4, "hidden_dim": 16, "batch_size": 4, "max_seq_len": 32}
    slow_native = not cpu["bf16_units"] and not cpu["forced"]  # PyTorch's bf16 GEMM is a scalar loop here
    few_native = not cpu["bf16_units"]  # forced too: the slow kernels may be emulated (docs/trainer.md)
    step = {}
    tmp = Path(tempfile.mkdtemp(prefix="wordystore-bench-", dir=CACHE))
    try:
        for choice in ("float32", "native", "auto"):
            steps = 4 if choice == "native" and few_native else args["steps"]  # 4: the median of 2 steps
            (run,) = recording_runs(["none"], {**args, "steps": steps, "bf16_matmul": choice}, tmp / choice)
            step[choice] = run["median_step_s"]
    finally:
        subprocess.run(["rm", "-rf", str(tmp)], check=True)
    what = "seed step" if not quick else "quick step"
    picked = numerics.choose("auto", "cpu").bf16_matmul
    speedup = step["native"] / step["float32"]
    row(
        "numerics",
        f"{what}: float32 against native"
        + (" (native: this CPU's kernels, not the forced class's)" if cpu["forced"] else ""),
        f"{step['native']:.3f} s (native)",
        f"{step['float32']:.3f} s",
        f"{speedup:.2f}x as fast",
        ">= 10x" if slow_native else "",
        speedup >= 10 if slow_native else None,
    )
    ratio = step["auto"] / step["float32"]
    row(
        "numerics",
        f"{what}: auto (picks {picked}) against float32",
        f"{step['float32']:.3f} s (float32)",
        f"{step['auto']:.3f} s",
        f"{ratio:.2f}x float32's time",
        "" if cpu["bf16_units"] else "<= 1.2x",
        None if cpu["bf16_units"] else ratio <= 1.2,
    )


def bench_main_job(quick: bool) -> None:
    """The seed job as the notebook runs it against ``wordystore train``: whole processes, the
    same steps, tokenization included, alternating (bench/trainer_bench.py)."""
    from bench.trainer_bench import medians, side_by_side

    steps, repeats = (2, 1) if quick else (10, 3)
    batch = 2 if quick else None  # quick: small batches, for the notebook's native bf16 on CPUs without bf16 units
    middle = medians(side_by_side(steps, repeats, batch_size=batch))
    nb, ws = middle["notebook"], middle["wordystore"]
    speedup = nb["wall_s"] / ws["wall_s"]
    row(
        "main job",
        f"seed job, {steps} steps{f', batch {batch}' if batch else ''}, whole processes (median of {repeats})",
        f"{nb['wall_s']:.1f} s (notebook)",
        f"{ws['wall_s']:.1f} s",
        f"{speedup:.2f}x as fast",
        ">= 2x",
        speedup >= 2,
    )
    rss_ratio = ws["peak_rss_gb"] / nb["peak_rss_gb"]  # the same run's processes: the same machine and load
    row(
        "main job",
        "peak RSS",
        f"{nb['peak_rss_gb']:.2f} GB (notebook)",
        f"{ws['peak_rss_gb']:.2f} GB",
        f"{rss_ratio:.2f}x",
        "<= 1.1x",
        rss_ratio <= 1.1,
    )


def bench_writer_memory(quick: bool) -> None:
    """A process that only writes: its peak RSS over what it held before creating the writer, for
    2.5 main chunks of seed-sized rows (the ring, the block thread, compaction and close)."""
    vocab, rows = (50257, 80) if not quick else (50257, 24)
    tmp = Path(tempfile.mkdtemp(prefix="wordystore-bench-", dir=CACHE))
    try:
        out = subprocess.run(
            [sys.executable, "-m", "bench.writer_memory_job", str(tmp / "w.zarr"), str(rows), str(vocab), "64"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    finally:
        subprocess.run(["rm", "-rf", str(tmp)], check=True)
    extra = json.loads(out.strip().splitlines()[-1])["extra_mb"]
    row(
        "recording",
        f"writer's extra peak RSS ({rows} seed-sized rows)",
        "300 MB (budget)",
        f"{extra:,.0f} MB",
        f"{extra / 300:.0%}",
        "<= 300 MB",
        extra <= 300,
    )


def results_name(quick: bool, skip_training: bool) -> str:
    """The results a run writes (bench/results/NAME.json): only a full run's rows are the docs'
    figures (``latest``, kept in git); a small or partial run writes beside them, never over them."""
    return "quick" if quick else "partial" if skip_training else "latest"


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a small run of every measurement (CI)")
    parser.add_argument("--store", help="measure this trajectory instead of the cached seed run")
    parser.add_argument("--skip-training", action="store_true", help="leave out the recording measurements")
    parser.add_argument(
        "--codecs",
        action="store_true",
        help="the codec table instead: size against encode core-seconds per kind (bench/results/codecs.md)",
    )
    parser.add_argument(
        "--scale",
        action="store_true",
        help="object storage, writer processes and a cluster instead (bench/scale.py, docs/scale.md)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: the GPU table instead (bench/gpu_bench.py; results in bench/results/gpu.md)",
    )
    parser.add_argument(
        "--write-docs",
        nargs="?",
        const=str(docs_tables.LATEST),
        metavar="RESULTS",
        help="measure nothing: write the tables marked in README.md and docs/ from a run's results "
        "(default: the latest full run's, bench/results/latest.json; bench/docs_tables.py)",
    )
    ns = parser.parse_args()
    if ns.write_docs:
        sys.exit(docs_tables.main([ns.write_docs]))
    if ns.scale:
        from bench import scale

        scale.main(ns.quick)
        return
    if ns.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error(
                f"--device cuda needs a CUDA GPU; this torch ({torch.__version__}) sees none "
                "(docs/targets.md: 'Benchmarks on a GPU machine')"
            )
        from bench import gpu_bench

        gpu_bench.run(ns.quick)
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    from trainer import numerics

    row("machine", "CPU class (what --bf16-matmul auto sees)", "-", numerics.cpu()["description"], "-")
    store, portable, seed = prepare(ns)
    if ns.codecs:
        from bench import codec_table
        from bench.table import RESULTS

        codec_table.main(store, ns.quick, RESULTS)
        return
    if not ns.skip_training:  # first, while this process is small: wait4's peak RSS counts it in
        cpu, steps = bench_recording(ns.quick)
        bench_recording_cost(store, cpu, steps)
        bench_plain_loop(ns.quick)
        bench_numerics(ns.quick)
        bench_main_job(ns.quick)
    bench_writer_memory(ns.quick)
    bench_writer(store, ns.quick)
    bench_size(store, portable, seed)
    bench_archive(store, seed, ns.quick)
    bench_reads(store, portable, seed, ns.quick)
    bench_read_threads(store)
    bench_efficiency(store)
    bench_peer(portable, ns.quick)
    bench_export_import(store, seed)
    on = f"on {ns.store}" if ns.store else "on the seed's 200-step run" if not ns.quick else "on the quick run"
    write_results(results_name(ns.quick, ns.skip_training), on)


if __name__ == "__main__":
    main()
