"""wordystore's own codec chain against zarr-python's (``zarr.codecs``, ``numcodecs.zarr3.PCodec``)
on a real store's chunks: single-threaded decode of the main tier's inner chunks of the four
[step, token, dim] kinds, in each profile, and of hot chunks (docs/format.md, "Why our own codec
chain"). Both decode the same bytes; the results are compared bit for bit.

    python -m bench.codec_chain STORE [--chunks 24] [--repeats 5]

STORE is a compact-profile trajectory (e.g. ``wordystore train /tmp/x.zarr --steps 40``); its
portable twin is written beside it with ``wordystore convert`` unless it exists. Each figure is MB
of decoded bytes per second of the process's CPU time, the best of ``--repeats`` passes over the
chunks, the decoders interleaved pass by pass (CPU time, not wall time: the machine is shared).

- ``wordystore``: :meth:`wordystore.format.codecs.ChunkCodecs.decode_into` into a reused buffer (what
  the reader does: blosc decompresses in place, pcodec decodes into the buffer).
- ``zarr, per chunk``: the array's inner codec pipeline as zarr-python builds it, one chunk a call.
- ``zarr, batched``: the same pipeline given every chunk in one call (its best case).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import zarr
from zarr.core.array_spec import ArrayConfig, ArraySpec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

import wordystore
from wordystore.store import storage
from wordystore.tools.convert import convert

KINDS = ("embeddings", "grads", "momentum", "variance")


def chunks_of(t, name: str, tier: str, limit: int) -> tuple[object, list[bytes]]:
    """(layout, encoded inner chunks) of up to ``limit`` chunks of one array of one tier."""
    layout = t.layouts[name][0 if tier == "main" else 1]
    found = []
    for key in sorted(storage.list_prefix(t.store, layout.chunk_prefix)):
        data = storage.get(t.store, key)
        tail = layout.decode_tail(data[-layout.tail_nbytes :], key)
        found += [data[a:b] for a, b in filter(None, map(tail.index.span, range(layout.n_chunks)))]
        if len(found) >= limit:
            break
    return layout, found[:limit]


def hot_chunks(t, name: str, limit: int) -> tuple[object, list[bytes]]:
    """Hot chunks of ``name``: the store's first rows encoded as the hot tier encodes them."""
    hot = t.layouts[name][1]
    rows = t[name].numpy(slice(0, hot.chunk[0]))
    found = []
    for start in range(0, rows.shape[1] - hot.chunk[1] + 1, hot.chunk[1]):  # whole chunks
        found.append(b"".join(hot.codecs.encode(np.ascontiguousarray(rows[:, start : start + hot.chunk[1]]))))
    return hot, found[:limit]


def best(runs: dict, repeats: int) -> dict[str, float]:
    """Per run, its least CPU time (the process's, every thread) over ``repeats`` rounds, the runs
    interleaved in each round: on a shared machine CPU time varies far less than wall time."""
    times = {label: [] for label in runs}
    for _ in range(repeats):
        for label, run in runs.items():
            began = time.process_time()
            run()
            times[label].append(time.process_time() - began)
    return {label: min(t) for label, t in times.items()}


def measure(path: Path, layout, chunks: list[bytes], repeats: int) -> dict[str, float]:
    """MB/s of each decoder over ``chunks``, after checking they decode to the same bits."""
    stored_shape = layout.codecs.stored_shape(layout.chunk)
    buffer = np.empty(stored_shape, layout.numpy_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        array = zarr.open_array(path / layout.path, mode="r")
    pipeline = array.metadata.codecs[0].codec_pipeline
    spec = ArraySpec(
        shape=layout.chunk,
        dtype=array.metadata.data_type,
        fill_value=array.metadata.fill_value,
        config=ArrayConfig.from_dict({}),
        prototype=default_buffer_prototype(),
    )
    buffers = [default_buffer_prototype().buffer.from_bytes(c) for c in chunks]

    ours = [np.ascontiguousarray(layout.codecs.decode_into(c, buffer)).copy() for c in chunks]
    theirs = sync(pipeline.decode([(b, spec) for b in buffers]))
    for a, b in zip(ours, theirs):
        assert a.view(np.uint8).tobytes() == np.ascontiguousarray(b.as_numpy_array()).view(np.uint8).tobytes()

    def wordystore_chain():
        for c in chunks:
            layout.codecs.decode_into(c, buffer)

    def zarr_per_chunk():
        for b in buffers:
            sync(pipeline.decode([(b, spec)]))

    def zarr_batched():
        sync(pipeline.decode([(b, spec) for b in buffers]))

    nbytes = len(chunks) * buffer.nbytes / 1e6
    runs = {"wordystore": wordystore_chain, "zarr, per chunk": zarr_per_chunk, "zarr, batched": zarr_batched}
    return {label: nbytes / seconds for label, seconds in best(runs, repeats).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", type=Path)
    parser.add_argument("--chunks", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    zarr.config.set({"async.concurrency": 1, "threading.max_workers": 1})  # single-threaded, as ours here
    portable = args.store.with_name(args.store.stem + "-portable.zarr")
    if not portable.exists():
        convert(args.store, portable, profile="portable", progress=False)
    rows = []
    for profile, path in (("compact", args.store), ("portable", portable)):
        t = wordystore.open(path, cache_bytes=0)
        for name in KINDS:
            layout, chunks = chunks_of(t, name, "main", args.chunks)
            rows.append((f"main, {profile}", layout.path, measure(path, layout, chunks, args.repeats)))
    t = wordystore.open(args.store, cache_bytes=0)
    for name in KINDS:
        layout, chunks = hot_chunks(t, name, args.chunks)
        rows.append(("hot", layout.path, None if not chunks else measure(args.store, layout, chunks, args.repeats)))
    print(
        f"{'tier, profile':<16} {'array':<22} {'wordystore':>11} {'zarr/chunk':>11} {'zarr/batch':>11}  "
        "(MB per CPU second)"
    )
    for tier, array, speeds in rows:
        if speeds:
            print(f"{tier:<16} {array:<22} " + " ".join(f"{v:>11,.0f}" for v in speeds.values()))


if __name__ == "__main__":
    main()
