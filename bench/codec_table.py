"""The codec per kind by measurement: size against encode core-seconds on a store's rows.

    python -m bench --codecs [--quick] [--store STORE]     # writes bench/results/codecs.md

For each [step, token, dim] kind (and ``logits``), the first main chunk of rows (``chunk_rows``
rows, as compaction encodes them: rows fastest, a predicted moment as its residuals) of a few of
the compact layout's token chunks spread over the vocabulary, encoded on one thread by each
candidate: pcodec at several levels, blosc zstd and lz4 with byte and bit shuffles, and byte-plane
splits of bfloat16 (the high bytes, sign, exponent and a mantissa bit, apart from the low bytes,
each plane compressed on its own). Each figure is the encoded size against the raw bytes, and the
CPU time (``time.process_time``: the machine may be shared) per recorded row of the whole kind,
scaled from the sample. :func:`encode_seconds_per_row` is the compact profile's own codec alone,
which the main table compares recording's cost with.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numcodecs
import numpy as np

PCODEC_LEVELS = (0, 2, 4, 8, 12)
TENSOR_KINDS = ("embeddings", "grads", "momentum", "variance", "logits")


def sample_tiles(store: Path, chunks: int) -> dict[str, tuple[list[np.ndarray], int]]:
    """Per kind: up to ``chunks`` tiles of the first main chunk of rows (each ``[rows, token chunk,
    ...]`` in stored order: rows fastest; a predicted kind as its residuals), and how many such
    tiles the whole kind has (to scale the sample to a row of the whole kind)."""
    import wordystore
    from wordystore.format.layout import Profile

    t = wordystore.open(store, cache_bytes=0)
    chunk_rows = t.layouts["grads"][0].chunk[0]  # the main tier's rows a chunk
    rows = min(chunk_rows, len(t))
    out = {}
    for name in TENSOR_KINDS:
        if name not in t.kinds:
            continue
        kind = t.kinds[name]
        prediction = t.predictions.get(name)
        layout = Profile("compact").main_layout(name, kind, rows, chunk_rows, prediction)
        per_chunk, tokens = layout.chunk[1], kind.shape[0]
        starts = np.unique(np.linspace(0, max(tokens - per_chunk, 0), chunks).astype(int) // per_chunk * per_chunk)
        tiles = []
        for start in starts:
            fetch = (slice(0, rows), slice(int(start), min(int(start) + per_chunk, tokens)))
            data = t[name].numpy(fetch)
            if prediction is not None:
                inputs = [
                    t[source].numpy(fetch if t.kinds[source].shape else fetch[:1]) for source in prediction.inputs
                ]
                data = prediction.residuals(data, inputs)
            stored = np.ascontiguousarray(np.moveaxis(data, 0, -1))  # rows fastest, as the compact layout
            tiles.append(stored.view(f"u{stored.dtype.itemsize}") if stored.dtype.kind != "i" else stored)
        out[name] = (tiles, -(-tokens // per_chunk))
    return out


def _pcodec(level: int) -> Callable[[np.ndarray], int]:
    from pcodec import ChunkConfig, standalone

    return lambda a: len(standalone.simple_compress(a.reshape(-1), ChunkConfig(compression_level=level)))


def _blosc(cname: str, clevel: int, shuffle: int) -> Callable[[np.ndarray], int]:
    codec = numcodecs.Blosc(cname, clevel, shuffle, 0)
    return lambda a: len(codec.encode(np.ascontiguousarray(a).view(f"V{a.dtype.itemsize}")))


def _planes(compress: Callable[[np.ndarray], int]) -> Callable[[np.ndarray], int]:
    """A 2-byte chunk's high and low bytes apart (bfloat16: sign, exponent and a mantissa bit;
    the other 7 mantissa bits), each plane compressed on its own."""

    def encode(a: np.ndarray) -> int:
        pairs = np.ascontiguousarray(a).view(np.uint8).reshape(-1, 2)
        return sum(compress(np.ascontiguousarray(pairs[:, i])) for i in (1, 0))  # little-endian: high byte second

    return encode


def candidates() -> dict[str, Callable[[np.ndarray], int]]:
    zstd_bytes = numcodecs.Zstd(level=1)
    plain = {
        **{f"pcodec level {level}": _pcodec(level) for level in PCODEC_LEVELS},
        "blosc zstd 1, byte shuffle": _blosc("zstd", 1, numcodecs.Blosc.SHUFFLE),
        "blosc zstd 1, bit shuffle": _blosc("zstd", 1, numcodecs.Blosc.BITSHUFFLE),
        "blosc zstd 3, bit shuffle": _blosc("zstd", 3, numcodecs.Blosc.BITSHUFFLE),
        "blosc lz4 5, byte shuffle": _blosc("lz4", 5, numcodecs.Blosc.SHUFFLE),
        "blosc lz4 5, bit shuffle": _blosc("lz4", 5, numcodecs.Blosc.BITSHUFFLE),
        "byte planes, zstd 1 each": _planes(lambda p: len(zstd_bytes.encode(p))),
        "byte planes, blosc lz4 5 bit shuffle each": _planes(_blosc("lz4", 5, numcodecs.Blosc.BITSHUFFLE)),
    }
    return plain


def measure(tiles: list[np.ndarray], encode: Callable[[np.ndarray], int], repeats: int) -> tuple[int, float]:
    """(encoded bytes of the tiles, CPU seconds to encode them once: the best of ``repeats``)."""
    best, size = float("inf"), 0
    for _ in range(repeats):
        began = time.process_time()
        size = sum(encode(tile) for tile in tiles)
        best = min(best, time.process_time() - began)
    return size, best


def encode_seconds_per_row(store: Path, chunks: int = 4) -> float:
    """CPU seconds the compact profile's main codec (pcodec level 8) takes to encode one recorded row
    of every [step, token, ...] kind, on one thread, from a sample of the store's first chunk of rows."""
    from wordystore.format.layout import PCODEC_LEVEL

    encode, total = _pcodec(PCODEC_LEVEL), 0.0
    for tiles, of in sample_tiles(store, chunks).values():
        if tiles and tiles[0].dtype.itemsize in (2, 4, 8):
            _, seconds = measure(tiles, encode, 1)
            total += seconds * of / len(tiles) / tiles[0].shape[-1]
    return total


def table(store: Path, quick: bool) -> str:
    """The markdown table: per kind and candidate, the size ratio and encode core-seconds a row."""
    numcodecs.blosc.set_nthreads(1)  # one thread: core-seconds
    samples = sample_tiles(store, 2 if quick else 8)
    lines = [
        f"Encode, one thread, on the first {next(iter(samples.values()))[0][0].shape[-1]} rows of {store.name} "
        "(a sample of token chunks; a predicted kind as its residuals). Size: raw bytes / encoded bytes; "
        "cost: CPU seconds to encode one recorded row of the whole kind; MB/s: raw bytes per CPU second.",
        "",
        "| kind | codec | ratio | encode core-s a row | MB/s |",
        "|---|---|---|---|---|",
    ]
    for name, (tiles, of) in samples.items():
        raw = sum(tile.nbytes for tile in tiles)
        rows = tiles[0].shape[-1]
        for label, encode in candidates().items():
            if ("planes" in label and tiles[0].dtype.itemsize != 2) or (
                "pcodec" in label and tiles[0].dtype.itemsize not in (2, 4, 8)
            ):
                continue
            size, seconds = measure(tiles, encode, 1 if quick else 3)
            per_row = seconds * of / len(tiles) / rows
            lines.append(
                f"| {name} | {label} | {raw / size:.2f}x | {per_row:.3g} | {raw / max(seconds, 1e-9) / 1e6:,.0f} |"
            )
    return "\n".join(lines)


def main(store: Path, quick: bool, results: Path) -> Path:
    text = table(store, quick)
    print(text)
    results.mkdir(exist_ok=True)
    path = results / ("codecs-quick.md" if quick else "codecs.md")
    path.write_text("# Codecs by measurement\n\n" + text + "\n")
    return path
