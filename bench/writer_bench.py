"""The write path on its own: a writer fed pre-made seed-size rows from memory as fast as it takes
them (the CPU proxy of recording at GPU speed), compaction of the same rows, and the time either
holds Python's GIL per row (what a Python-bound training loop on a GPU loses to it).

    python -m bench.writer_bench [--rows 32] [--threads 1,2] [--store runs/wb1b.zarr]

Rows come from a recorded trajectory when one is given (``--store``: its first rows), else from a
replay of AdamW on a bf16 [vocab, dim] embedding with random gradients (trajectory-like data:
moments that the Adam prediction replays). Every figure is measured in this process, each thread
count against one thread in the same run.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from bench.gil import GilProbe
from wordystore.format.layout import Profile

GPU_STEP_S = 1 / 57  # the H200's training step without recording (56-59 steps/s): almost all of it Python


def synthetic_rows(n: int, vocab: int, dim: int, seed: int = 0) -> list[dict]:
    """``n`` rows as the trainer records them, from AdamW on a bf16 embedding with random gradients
    (clipped at 1.0, as the seed run's): moments the Adam prediction replays, as a run's are."""
    gen = torch.Generator().manual_seed(seed)
    param = torch.nn.Parameter((torch.randn(vocab, dim, generator=gen) * 0.02).to(torch.bfloat16))
    optimizer = torch.optim.AdamW([param], lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    rows = []
    for step in range(n):
        scale = 1e-3 * (1 + (torch.arange(vocab) % 7 == 0).float())[:, None]  # some tokens move more
        param.grad = (torch.randn(vocab, dim, generator=gen) * scale).to(torch.bfloat16)
        grads = param.grad.clone()
        norm = float(torch.nn.utils.clip_grad_norm_([param], 1.0))
        optimizer.step()
        state = optimizer.state[param]
        rows.append(
            {
                "embeddings": param.detach().clone(),
                "grads": grads,
                "momentum": state["exp_avg"].clone(),
                "variance": state["exp_avg_sq"].clone(),
                "logits": torch.randn(vocab, generator=gen).to(torch.bfloat16),
                "losses": 10.0 - step / 100,
                "learning_rate": 1e-3,
                "grad_norm": norm,
                "grad_norm_clipped": min(norm, 1.0),
            }
        )
    return rows


def recorded_rows(store, n: int) -> list[dict]:
    """The first ``n`` rows of a recorded trajectory, as tensors to append."""
    import wordystore
    from wordystore.format.kinds import numpy_to_torch

    t = wordystore.open(store, cache_bytes=0)
    data = {name: t[name].numpy(slice(0, n)) for name in t.kinds}
    return [{name: numpy_to_torch(np.array(values[i])) for name, values in data.items()} for i in range(n)]


def kinds_and_predictions(vocab: int, dim: int):
    import wordystore

    return wordystore.seed_kinds(vocab, dim), wordystore.adam_predictions(0.9, 0.999, 1.0)


def row_bytes(row: dict) -> int:
    return sum(v.numel() * v.element_size() for v in row.values() if isinstance(v, torch.Tensor))


def ingest(path: Path, rows: list[dict], threads: int, vocab: int, dim: int, process: bool = False):
    """Append ``rows`` to a new store as fast as the writer takes them, compacting nothing: rows/s
    into the hot tier, committed. Returns the figures and the writer, still open (the rows stay
    hot for :func:`compaction`; ``abandon()`` it)."""
    import wordystore

    kinds, predictions = kinds_and_predictions(vocab, dim)
    shutil.rmtree(path, ignore_errors=True)
    w = wordystore.create(
        path, kinds, predictions=predictions, write_threads=threads, compaction_threads=0, writer_process=process
    )
    began = time.perf_counter()
    for i, row in enumerate(rows):
        w.append(i, **row)
    w.flush()
    seconds = time.perf_counter() - began
    return {"rows_per_s": len(rows) / seconds, "seconds": seconds}, w


def compaction(path: Path, threads: int) -> dict:
    """Compact the hot rows of ``path`` (a chunk of rows or more, as :func:`ingest` left them) into
    main shards with ``threads`` threads, as the writer's compaction does (the shards are written;
    the commit record is left alone): MB/s of rows."""
    from wordystore.read import reading
    from wordystore.store import storage
    from wordystore.write import compaction as compact

    store = storage.as_store(path, read_only=False)  # the writer's lock stays with the writer
    reader = reading.StoreReader.open(store, cache_bytes=0)
    rows = reader.record.committed_rows
    chunk = reader.meta.chunk_rows
    layouts = {name: main for name, (main, _) in reader.layouts.items()}
    per_row = sum(math.prod(kind.shape) * kind.numpy_dtype.itemsize for kind in reader.meta.arrays().values())
    done = rows - rows % chunk
    with ThreadPoolExecutor(threads) as pool:
        began = time.perf_counter()
        for start in range(0, done, chunk):
            compact.write_main_rows(
                store, layouts, reader.meta.arrays(), reader.read_into, start, start + chunk, pool, durable=True
            )
        seconds = time.perf_counter() - began
    reader.close()
    return {"mb_per_s": done * per_row / seconds / 1e6, "seconds": seconds}


def recording_gil(path: Path, rows: list[dict], threads: int, vocab: int, dim: int, process: bool) -> float:
    """Milliseconds of GIL a Python-bound thread loses per row while a writer records ``rows``
    (appends, hot tier, compaction of every whole chunk) with its pools beside it or in a child
    ``process``."""
    import wordystore

    kinds, predictions = kinds_and_predictions(vocab, dim)
    shutil.rmtree(path, ignore_errors=True)
    w = wordystore.create(
        path, kinds, predictions=predictions, write_threads=threads, compaction_threads=threads, writer_process=process
    )
    w.append(0, **rows[0])
    w.flush()  # a child process has started
    with GilProbe() as gil:
        for i, row in enumerate(rows[1:], start=1):
            w.append(i, **row)
        w.flush()
        while w.stats().hot_rows >= w.chunk_rows:  # every whole chunk compacted
            time.sleep(0.005)
    w.abandon()
    return gil.blocked / (len(rows) - 1) * 1e3


def hot_codecs(path: Path, rows: list[dict], vocab: int, dim: int) -> dict[str, float]:
    """Rows/s of one thread encoding and storing blocks of ``rows`` as hot shards (fsynced), in
    today's hot codec (raw bytes and a checksum) and in blosc lz4 (the hot codec before it)."""
    import wordystore
    from wordystore.format import codecs
    from wordystore.format.kinds import torch_to_numpy
    from wordystore.store import storage
    from wordystore.write import compaction as compact

    kinds = wordystore.seed_kinds(vocab, dim)
    store = storage.as_store(path, read_only=False)
    block = {name: [np.stack([torch_to_numpy(torch.as_tensor(r[name])) for r in rows[:8]])] for name in kinds}
    binding = codecs.ShardBinding("0" * 32, decoding=True)  # bound, as every format-4 shard is
    rates = {}
    for label in ("raw", "lz4"):
        began = time.perf_counter()
        for name, kind in kinds.items():
            layout = Profile("compact").hot_layout(name, kind, 8, binding=binding, raw=label == "raw")
            for coords in compact.block_shards(layout, 0):
                compact.write_hot_shard(store, layout, coords, block[name], durable=True)
        rates[label] = 8 / (time.perf_counter() - began)
    shutil.rmtree(path, ignore_errors=True)
    return rates


def fed_from_memory(path: Path, rows: list[dict], vocab: int, dim: int) -> float:
    """Rows/s of a writer with the machine's default pools (a child process where it can run)
    fed ``rows`` from memory as fast as it takes them, from the second append to the end of close
    (the first, flushed, starts the child process)."""
    import wordystore

    kinds, predictions = kinds_and_predictions(vocab, dim)
    shutil.rmtree(path, ignore_errors=True)
    with wordystore.create(path, kinds, predictions=predictions) as w:
        w.append(0, **rows[0])
        w.flush()
        began = time.perf_counter()
        for i, row in enumerate(rows[1:], start=1):
            w.append(i, **row)
    seconds = time.perf_counter() - began
    shutil.rmtree(path, ignore_errors=True)
    return (len(rows) - 1) / seconds


def lz4_alone(rows: list[dict], threads: int) -> float:
    """Rows/s of blosc lz4 (level 5, byte shuffle) alone compressing the same rows' tensors (from
    the second row, as :func:`fed_from_memory` counts them) on ``threads`` threads, a row a task:
    the floor a writer's cost is compared with."""
    import numcodecs

    from wordystore.format.kinds import torch_to_numpy

    codec = numcodecs.Blosc("lz4", 5, numcodecs.Blosc.SHUFFLE, 0)
    arrays = [[torch_to_numpy(v) for v in row.values() if isinstance(v, torch.Tensor)] for row in rows[1:]]
    numcodecs.blosc.set_nthreads(1)

    def compress(row: list[np.ndarray]) -> int:
        return sum(len(codec.encode(np.ascontiguousarray(a).view(f"V{a.dtype.itemsize}"))) for a in row)

    with ThreadPoolExecutor(threads) as pool:
        began = time.perf_counter()
        list(pool.map(compress, arrays))
        seconds = time.perf_counter() - began
    return len(arrays) / seconds


def measure(rows: list[dict], thread_counts: list[int], vocab: int, dim: int, where: Path) -> dict:
    """Ingest and compaction by thread count, the hot codecs, and the GIL a Python-bound thread
    loses per recorded row with the pools beside it and in a child process."""
    results = {"row_mb": row_bytes(rows[0]) / 1e6, "ingest": {}, "compaction": {}}
    path = where / "proxy.zarr"
    for threads in thread_counts:
        results["ingest"][threads], writer = ingest(path, rows, threads, vocab, dim)
        results["compaction"][threads] = compaction(path, threads)
        writer.abandon()
    results["hot_codecs"] = hot_codecs(path, rows, vocab, dim)
    results["gil_threads_ms"] = recording_gil(path, rows, max(thread_counts), vocab, dim, process=False)
    results["gil_process_ms"] = recording_gil(path, rows, max(thread_counts), vocab, dim, process=True)
    results["fed_rows_per_s"] = fed_from_memory(path, rows, vocab, dim)
    results["lz4_rows_per_s"] = lz4_alone(rows, max(thread_counts))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--store", help="take the rows from this trajectory (its first --rows rows)")
    ns = parser.parse_args()
    rows = recorded_rows(ns.store, ns.rows) if ns.store else synthetic_rows(ns.rows, ns.vocab, ns.dim)
    threads = [int(n) for n in ns.threads.split(",")]
    with tempfile.TemporaryDirectory(prefix="writer-bench-") as tmp:
        r = measure(rows, threads, ns.vocab, ns.dim, Path(tmp))
    print(f"{ns.rows} rows of {r['row_mb']:.1f} MB, {os.cpu_count()} cores")
    for n in threads:
        print(
            f"  {n} thread(s): ingest {r['ingest'][n]['rows_per_s']:.1f} rows/s, "
            f"compaction {r['compaction'][n]['mb_per_s']:.0f} MB/s"
        )
    print(f"  hot tier, 1 thread: raw {r['hot_codecs']['raw']:.1f} rows/s, lz4 {r['hot_codecs']['lz4']:.1f} rows/s")
    for label, key in (("pools beside training", "gil_threads_ms"), ("pools in a child process", "gil_process_ms")):
        print(
            f"  GIL lost per recorded row, {label}: {r[key]:.2f} ms "
            f"({r[key] / (GPU_STEP_S * 1e3):.0%} of a 57 steps/s GPU step)"
        )


if __name__ == "__main__":
    main()
