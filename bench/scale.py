"""Beyond one machine (docs/scale.md): a store on an S3 server on loopback against a local directory,
one writer process against two, and an analysis in this process against a 2-worker LocalCluster;
every figure a ratio against a baseline measured in the same run.

    python -m bench --scale            # the seed's shape: 30 rows of 4 x [50257, 64] bf16 (~10 minutes)
    python -m bench --scale --quick    # small rows, every measurement (about a minute)

The servers are tests/s3_servers.py's: moto's ThreadedMotoServer (in this process) and SeaweedFS
(``weed``, a process of its own) where it starts. Times are wall clock (provisional on a shared
machine); requests and bytes per row are counted by a CountingProxy in a second, untimed pass, and
do not depend on timing. Rows are tests/s3_rows.py's (the seed's shape, a tenth of the tokens
training). Results: bench/results/scale.md and scale.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from s3_rows import Rows  # noqa: E402
from s3_servers import CountingProxy, ServerUnavailable, start_moto, start_seaweedfs  # noqa: E402

import wordystore  # noqa: E402
from wordystore.analysis import measures  # noqa: E402
from wordystore.store import storage  # noqa: E402

RESULTS = ROOT / "bench" / "results"
LINES: list[str] = []
FIGURES: dict = {}


def say(line: str) -> None:
    LINES.append(line)
    print(line, flush=True)


def record(where, rows: Rows, data: list[dict], **options) -> float:
    """Seconds to create ``where``, append ``data`` and close (compaction included)."""
    began = time.perf_counter()
    with wordystore.create(where, rows.kinds(), token_sets={"untrained": rows.untrained}, **options) as writer:
        for r, row in enumerate(data):
            writer.append(rows.step(r), **row)
    return time.perf_counter() - began


def read_untrained(where, **options) -> float:
    """Seconds to open ``where`` afresh and read every row's untrained tokens."""
    began = time.perf_counter()
    t = wordystore.open(where, **options)
    t.embeddings[:, "untrained"]
    return time.perf_counter() - began


def per_row(counts: dict, n: int) -> str:
    requests = counts["requests"]
    ops = " ".join(f"{op} {k / n:.1f}" for op, k in sorted(requests.items()))
    return (
        f"{sum(requests.values()) / n:.1f} requests/row ({ops}); {sum(counts['sent'].values()) / n / 1e6:.2f} MB "
        f"sent/row, {sum(counts['received'].values()) / n / 1e6:.2f} MB received/row"
    )


def bench_recording(server, bucket, workdir: Path, quick: bool) -> None:
    """The seed's recording, local against S3: rows/s written, the untrained slice read, requests."""
    n, rows = (10, Rows(vocab=4096, dim=64)) if quick else (30, Rows(vocab=50257, dim=64))
    data = [rows.row(r) for r in range(n)]
    local, url = workdir / "local.zarr", f"{bucket.url}/seed.zarr"
    write_local, write_s3 = record(local, rows, data), record(url, rows, data)
    read_local, read_s3 = read_untrained(local), read_untrained(url)
    stored = storage.size(storage.as_store(url, read_only=True))
    say(
        f"| {server.name} | seed recording, {n} rows of {rows.vocab} tokens: rows/s written | {n / write_local:.2f} "
        f"| {n / write_s3:.2f} | **{write_local / write_s3:.2f}x** local (target >= 0.5x) |"
    )
    say(
        f"| {server.name} | untrained slice of every row: seconds | {read_local:.2f} | {read_s3:.2f} | "
        f"**{read_s3 / read_local:.2f}x** local (target <= 2x) |"
    )
    with CountingProxy(server.endpoint) as proxy:
        endpoint = {"storage_options": {"endpoint": proxy.endpoint}}
        record(f"{bucket.url}/seed-counted.zarr", rows, data, **endpoint)
        written = proxy.snapshot()
        proxy.reset()
        read_untrained(f"{bucket.url}/seed-counted.zarr", **endpoint)
        read = proxy.snapshot()
    say(
        f"| {server.name} | cost of a row written (create, appends, compaction, close) | - | {per_row(written, n)} | "
        f"stored {stored / n / 1e6:.2f} MB/row |"
    )
    say(f"| {server.name} | reading the untrained slice of {n} rows | - | {per_row(read, 1).replace('/row', '')} | - |")
    FIGURES[server.name] = {
        "rows": n,
        "vocab": rows.vocab,
        "write_s": [write_local, write_s3],
        "read_s": [read_local, read_s3],
        "written": written,
        "read": read,
        "stored_bytes": stored,
    }


def bench_writers(server, bucket, quick: bool) -> None:
    """One writer process against two, each its own store of a large kind on the server."""
    vocab, dim, n = (4096, 256, 8) if quick else (50257, 1024, 8)
    runs = {}
    for processes in (1, 2):
        children = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.scale",
                    "writer",
                    f"{bucket.url}/w{processes}-{i}.zarr",
                    str(vocab),
                    str(dim),
                    str(n),
                ],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(processes)
        ]
        seconds = [float(child.communicate(timeout=1800)[0].split()[-1]) for child in children]
        runs[processes] = processes * n / max(seconds)
    say(
        f"| {server.name} | writer processes, [{vocab}, {dim}] bf16 rows, {n} each: rows/s | {runs[1]:.2f} (1) | "
        f"{runs[2]:.2f} (2) | **{runs[2] / runs[1]:.2f}x** |"
    )
    FIGURES.setdefault(server.name, {})["writers_rows_per_s"] = runs


def write_alone(url: str, vocab: int, dim: int, n: int) -> None:
    """A writer process of :func:`bench_writers`: one large kind, ``n`` rows; prints its seconds."""
    import torch

    kind = wordystore.Kind((vocab, dim), "bfloat16", ("token", "dim"))
    base = torch.randn(vocab, dim).bfloat16()
    began = time.perf_counter()
    with wordystore.create(url, {"weight": kind}) as writer:
        for r in range(n):
            base[r % vocab] += 1  # each row differs
            writer.append(r, weight=base)
    print(f"{time.perf_counter() - began:.3f}", flush=True)


def bench_cluster(server, bucket, quick: bool) -> None:
    """moment_norms of the S3 store in this process, against a LocalCluster of 2 worker processes."""
    import distributed

    environment = dict(os.environ)  # a LocalCluster sets OMP_NUM_THREADS=1 in its parent for good
    t = wordystore.open(f"{bucket.url}/seed.zarr")
    began = time.perf_counter()
    here = measures.moment_norms(t, "untrained")
    local_s = time.perf_counter() - began
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        distributed.Client(cluster) as client,
    ):
        client.run(lambda: None)  # workers up
        began = time.perf_counter()
        there = measures.moment_norms(t, "untrained", client=client)
        cluster_s = time.perf_counter() - began
        same = (
            t.momentum.to_dask()[:, :100].compute().tobytes()
            == t.momentum.numpy((slice(None), slice(0, 100))).tobytes()
        )
    os.environ.clear()
    os.environ.update(environment)
    equal = all(here[k].tobytes() == there[k].tobytes() for k in here) and same
    say(
        f"| {server.name} | moment_norms of the untrained tokens, {len(t)} rows: rows/s | {len(t) / local_s:.2f} "
        f"(this process) | {len(t) / cluster_s:.2f} (2 workers) | **{local_s / cluster_s:.2f}x**; bit-equal: {equal} |"
    )
    FIGURES.setdefault(server.name, {})["cluster_s"] = [local_s, cluster_s, equal]


def main(quick: bool) -> None:
    say("| server | measure | baseline | ours | ratio |")
    say("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="wordystore-bench-scale-") as scratch:
        scratch = Path(scratch)
        for name, start in (("moto", start_moto), ("seaweedfs", lambda: start_seaweedfs(scratch / "weed"))):
            try:
                with start() as server, server.environment():
                    bucket = server.new_bucket("bench")
                    workdir = scratch / name
                    workdir.mkdir()
                    bench_recording(server, bucket, workdir, quick)
                    bench_writers(server, bucket, quick)
                    bench_cluster(server, bucket, quick)
                    shutil.rmtree(workdir)
            except ServerUnavailable as exc:
                say(f"| {name} | not measured: {exc} | | | |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale.md").write_text("\n".join(LINES) + "\n")
    (RESULTS / "scale.json").write_text(json.dumps(FIGURES, indent=1, default=str))


if __name__ == "__main__":
    if sys.argv[1:2] == ["writer"]:
        write_alone(sys.argv[2], *map(int, sys.argv[3:6]))
    else:
        main("--quick" in sys.argv)
