"""Store benchmark on a real trajectory of the seed config, against the same data in the seed's
single-safetensors layout, in one run: bytes on disk, write/export/import throughput with peak RSS,
and read latency for the notebook's three access patterns.

    python bench/store_bench.py --steps 40            # trains a 40-step trajectory first
    python bench/store_bench.py --store runs/wb1b.zarr
"""

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from safetensors import safe_open

import wordystore


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB, polled) of a child process."""
    start = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed with {proc.returncode}")
    return time.perf_counter() - start, peak / 1e6


def best_of(fn, repeat=5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--store")
    parser.add_argument("--steps", type=int, default=40)
    ns = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="wordystore-bench-"))
    cli = [sys.executable, "-m", "wordystore.cli"]
    store = Path(ns.store) if ns.store else tmp / "run.zarr"
    if not ns.store:
        subprocess.run([*cli, "train", str(store), "--steps", str(ns.steps), "--quiet"], check=True)
    t = wordystore.open(store)
    print(t)

    print("\n## bytes on disk")
    print("| kind | raw MB | stored MB | ratio |\n|---|---|---|---|")
    total_raw = total_disk = 0
    for name, kind in t.kinds.items():
        raw = len(t) * kind.step_nbytes
        disk = dir_bytes(store / name)
        total_raw += raw
        total_disk += disk
        if raw > 1e6:
            print(f"| {name} | {raw / 1e6:.1f} | {disk / 1e6:.1f} | {raw / disk:.2f}x |")
    print(f"| all | {total_raw / 1e6:.1f} | {dir_bytes(store) / 1e6:.1f} | {total_raw / dir_bytes(store):.2f}x |")

    seed = tmp / "seed.safetensors"
    export_s, export_rss = run_measured([*cli, "export", str(store), str(seed)])
    size = seed.stat().st_size
    import_s, import_rss = run_measured([*cli, "import", str(seed), str(tmp / "imported.zarr")])
    with safe_open(str(seed), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    from safetensors.torch import save_file

    base_s = best_of(lambda: save_file(tensors, str(tmp / "copy.safetensors")), repeat=2)
    del tensors
    print("\n## throughput (MB of seed-layout data per second) and peak RSS")
    print("| operation | seconds | MB/s | peak RSS MB |\n|---|---|---|---|")
    print(f"| baseline: safetensors save_file, all in RAM | {base_s:.2f} | {size / 1e6 / base_s:.0f} | (whole file in RAM: {size / 1e6:.0f}) |")
    print(f"| wordystore import (write path: append + compress + commit) | {import_s:.2f} | {size / 1e6 / import_s:.0f} | {import_rss:.0f} |")
    print(f"| wordystore export (streaming) | {export_s:.2f} | {size / 1e6 / export_s:.0f} | {export_rss:.0f} |")

    untrained = t.token_sets["untrained"]
    n = len(t)
    with safe_open(str(seed), "pt") as f:
        emb = f.get_slice("embeddings")
        cases = {
            "untrained slice, all steps": (lambda: emb[0:n][:, untrained], lambda: t.embeddings[0:n, "untrained"]),
            "one token, all steps": (lambda: emb[:, 1234:1235], lambda: t.embeddings[:, 1234]),
            "one whole step": (lambda: emb[n // 2 : n // 2 + 1], lambda: t.embeddings[n // 2]),
        }
        print(f"\n## read latency, embeddings ({n} steps), best of 5, warm cache")
        print("| read | safetensors (seed file) | wordystore | ratio |\n|---|---|---|---|")
        for label, (baseline, ours) in cases.items():
            assert torch.equal(baseline().squeeze().view(torch.int16), ours().squeeze().view(torch.int16))
            b, o = best_of(baseline), best_of(ours)
            print(f"| {label} | {b * 1e3:.1f} ms | {o * 1e3:.1f} ms | {o / b:.1f}x |")


if __name__ == "__main__":
    main()
