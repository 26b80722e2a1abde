"""xarray and a dask cluster against the report on a real store (a check on the seed's
200-step run): the untrained displacement at every step through ``xr.open_dataset(path,
engine="wordystore")`` equals ``measures.embedding_stats``' ``displacement_max``, and a
LocalCluster of 2 worker processes computes it bit-equal to this process.

    python -m bench.xarray_check runs/wb1b.zarr
"""

import sys
import time

import numpy as np
import xarray as xr
from distributed import Client, LocalCluster

import wordystore
from wordystore.analysis import measures


def main() -> None:
    path = sys.argv[1]
    t = wordystore.open(path)
    began = time.perf_counter()
    report = measures.embedding_stats(t, "untrained").table["displacement_max"]
    print(f"measures.embedding_stats: {time.perf_counter() - began:.1f} s, last row {report[-1]:.7g}")
    ds = xr.open_dataset(path, engine="wordystore")
    began = time.perf_counter()
    e = ds.embeddings.isel(token=ds.untrained).astype("float32").values
    via_xarray = np.sqrt(((e - e[0]) ** 2).sum(-1)).max(-1)
    print(
        f"xarray: {time.perf_counter() - began:.1f} s; equal to the report's at every step: "
        f"{np.array_equal(via_xarray, report)}"
    )
    d = t.embeddings.to_dask()[:, t.token_set("untrained")].astype(np.float32)
    displacement = np.sqrt(((d - d[0]) ** 2).sum(-1)).max(-1)
    here = displacement.compute(scheduler="threads")
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster) as client:
        began = time.perf_counter()
        there = client.compute(displacement, sync=True)
        print(
            f"a 2-worker LocalCluster: {time.perf_counter() - began:.1f} s; bit-equal to this process: "
            f"{here.tobytes() == there.tobytes()}; equal to the report's: {np.array_equal(there, report)}"
        )


if __name__ == "__main__":  # spawned workers import the main module again
    main()
