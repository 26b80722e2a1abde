"""Profiles and array layouts: how each array of a profile is cut into shards and chunks and which
codecs encode it (:class:`Profile`, :class:`ArrayLayout`), and the checks on kinds, rows and predictions
a store is created with (docs/format.md, "Arrays")."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from wordystore.errors import FormatError
from wordystore.format.codecs import (
    BFloat16Bits,
    Blosc,
    Bytes,
    ChunkCodecs,
    Crc32c,
    PCodec,
    ShardBinding,
    ShardTail,
    Transpose,
    decoding_digest,
    encode_shard,
)
from wordystore.format.keys import (
    ATTRS_KEY,
    CHUNK_DIR,
    FORMAT_VERSION,
    MAX_CHUNK_ROWS,
    MAX_ROW_BYTES,
    STEPS_ARRAY,
    STEPS_KIND,
    array_path,
    check_kind_name,
    token_set_path,
    vocab_size,
)
from wordystore.format.kinds import Kind, numpy_dtype
from wordystore.format.prediction import RESIDUAL_DTYPES, AdamStepPrediction, Prediction, prediction_from_json

# -- array encodings ------------------------------------------------------------------------------------

BLOCK_ROWS = 8  # rows per hot chunk: what the writer buffers before writing
CHUNK_ROWS = 32  # rows per main chunk: long runs of steps compress well (docs/format.md)
CHUNK_BYTES = 1 << 20  # target raw bytes of one main inner chunk (256 tokens x 64 dims x 32 rows)
CHUNKS_PER_SHARD = 16  # inner chunks per shard along the first per-step axis (tokens)
PCODEC_LEVEL = 8
PROFILES = ("compact", "portable", "archive")
RESIDUAL_PROFILES = frozenset({"compact", "archive"})  # profiles whose main tier stores predicted kinds as residuals
BITSHUFFLE_KINDS = frozenset({"grads", "momentum"})  # measured: bit shuffle wins on these
INTEGER_DTYPES = frozenset({"int8", "int16", "int32", "int64", "uint8"})
PCODEC_DTYPES = frozenset({"uint16", "int16", "float16", "int32", "float32", "int64", "float64"})  # what pcodec takes


def stored_dtype(kind: Kind, profile: str, version: int = FORMAT_VERSION) -> str:
    """The ``data_type`` a kind is stored as: its own (format 3); format 2 stored bfloat16 as its
    ``uint16`` bits in the compact profile, saying so in a ``view_as`` attribute."""
    if version < 3 and kind.dtype == "bfloat16" and profile == "compact":
        return "uint16"
    return kind.dtype


def residual_attributes(name: str, prediction, version: int = FORMAT_VERSION) -> dict:
    """The attributes of a predicted kind's main array, whose values are residuals: ``{"residuals_of":
    kind, "prediction": ...}`` (format 2: ``{"view_as": "bfloat16", "residual_of": ...}``)."""
    if version < 3:
        return {ATTRS_KEY: {"view_as": "bfloat16", "residual_of": prediction.to_json()}}
    return {ATTRS_KEY: {"residuals_of": name, "prediction": prediction.to_json()}}


@dataclass(frozen=True)
class ArrayLayout:
    """One zarr v3 array of the store: its key, stored dtype, shape, shards, inner chunks, codecs,
    and (format 3) the :class:`ShardBinding` its shards carry.

    ``to_zarr_json`` writes the array's ``zarr.json``; ``from_zarr_json`` reads one back (and
    refuses codecs wordystore does not implement), so the arrays stay readable by any zarr v3
    reader, and wordystore's own reader needs nothing but these documents and the metadata.
    """

    path: str
    dtype: str
    shape: tuple[int, ...]
    shard: tuple[int, ...]
    chunk: tuple[int, ...]
    codecs: ChunkCodecs
    dims: tuple[str, ...]
    attributes: dict = field(default_factory=dict, compare=False)
    binding: ShardBinding | None = field(default=None, compare=False)

    @property
    def numpy_dtype(self) -> np.dtype:
        return numpy_dtype(self.dtype)

    @property
    def prediction(self) -> Prediction | None:
        """Set when the array stores residuals of a predicted kind (see :func:`residual_attributes`)."""
        attributes = self.attributes.get(ATTRS_KEY, {})
        doc = attributes.get("prediction", attributes.get("residual_of"))  # format 3, format 2
        return None if doc is None else prediction_from_json(doc)

    @functools.cached_property
    def decoding(self) -> bytes:
        """The digest of what decodes the array's shards, which a format-4 binding record holds
        (docs/format.md, "Binding"): the data type, the shape per row, the shard and inner chunk
        shapes, the codec chain and the prediction (None if the array holds no residuals)."""
        prediction = self.prediction
        return decoding_digest(
            {
                "data_type": self.dtype,
                "shape": list(self.shape[1:]),
                "shard_shape": list(self.shard),
                "chunk_shape": list(self.chunk),
                "codecs": self.codecs.to_list(),
                "prediction": None if prediction is None else prediction.to_json(),
            }
        )

    @functools.cached_property
    def chunks_per_shard(self) -> tuple[int, ...]:
        return tuple(s // c for s, c in zip(self.shard, self.chunk))

    @functools.cached_property
    def n_chunks(self) -> int:
        """Inner chunks per shard."""
        return math.prod(self.chunks_per_shard)

    @functools.cached_property
    def tail_nbytes(self) -> int:
        """Bytes of a shard's tail: its index, and its binding record if bound."""
        return ShardTail.nbytes(self.n_chunks, self.binding)

    @functools.cached_property
    def max_chunk_nbytes(self) -> int:
        """The most bytes an encoded inner chunk may take: no codec of a chain doubles its input."""
        return 2 * math.prod(self.chunk) * self.numpy_dtype.itemsize + 4096

    @functools.cached_property
    def max_shard_nbytes(self) -> int:
        return self.n_chunks * self.max_chunk_nbytes + self.tail_nbytes

    @property
    def chunk_prefix(self) -> str:
        """The prefix of every shard key of the array."""
        return f"{self.path}/{CHUNK_DIR}/"

    def shard_grid(self) -> tuple[int, ...]:
        return tuple(math.ceil(n / s) for n, s in zip(self.shape, self.shard))

    def shard_key(self, coords: tuple[int, ...]) -> str:
        return self.chunk_prefix + "/".join(str(c) for c in coords)

    def shard_coords(self, key: str) -> tuple[int, ...] | None:
        """The coordinates of the shard at ``key``; None for a key that is no shard of the array
        (another array's, or a temporary file)."""
        parts = key.removeprefix(self.chunk_prefix).split("/") if key.startswith(self.chunk_prefix) else []
        if len(parts) != len(self.shape) or not all(p.isdecimal() and p.isascii() for p in parts):
            return None
        return tuple(int(p) for p in parts)

    def shards_holding(self, lo: int, hi: int) -> Iterator[tuple[tuple[int, ...], int, int]]:
        """(shard coordinates, first row, end row) of every shard holding rows ``[lo, hi)``."""
        rows = self.shard[0]
        for r in range(lo // rows, math.ceil(hi / rows) if hi > lo else 0):
            for rest in np.ndindex(*self.shard_grid()[1:]):
                yield (r, *rest), max(lo, r * rows), min(hi, (r + 1) * rows)

    def with_rows(self, rows: int) -> ArrayLayout:
        return replace(self, shape=(rows, *self.shape[1:]))

    def shard_region(self, coords: tuple[int, ...]) -> tuple[slice, ...]:
        """The part of the array shard ``coords`` covers (clipped to the array's shape)."""
        return tuple(slice(c * s, min((c + 1) * s, n)) for c, s, n in zip(coords, self.shard, self.shape))

    def encode_shard(self, coords: tuple[int, ...], data: np.ndarray) -> np.ndarray:
        """Shard ``coords``'s bytes (a uint8 array) from its region's data, whose first ``len(data)``
        rows hold written data (edge shards are zero-padded to full chunks)."""
        data = data.view(self.numpy_dtype) if data.dtype != self.numpy_dtype else data
        rows = data.shape[0]
        if data.shape != self.shard:
            padded = np.zeros(self.shard, self.numpy_dtype)
            padded[tuple(slice(0, n) for n in data.shape)] = data
            data = padded
        grid = [range(0, s, c) for s, c in zip(self.shard, self.chunk)]
        chunks = [
            self.codecs.encode(data[tuple(slice(a, a + c) for a, c in zip(corner, self.chunk))])
            for corner in itertools.product(*grid)
        ]
        return encode_shard(chunks, self.binding, self.shard_key(coords), rows, self.decoding)

    def decode_tail(self, tail, key: str) -> ShardTail:
        """The tail (last :attr:`tail_nbytes` bytes) of the shard at ``key``, checked."""
        return ShardTail.decode(tail, self.n_chunks, self.binding, key, self.decoding, self.shard[0])

    def to_zarr_json(self) -> dict:
        return {
            "zarr_format": 3,
            "node_type": "array",
            "shape": list(self.shape),
            "data_type": self.dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(self.shard)}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": 0,
            "codecs": [
                {
                    "name": "sharding_indexed",
                    "configuration": {
                        "chunk_shape": list(self.chunk),
                        "codecs": self.codecs.to_list(),
                        "index_codecs": [Bytes().to_dict(), Crc32c().to_dict()],
                        "index_location": "end",
                    },
                }
            ],
            "attributes": self.attributes,
            "dimension_names": list(self.dims),
        }

    @classmethod
    def from_zarr_json(cls, path: str, doc: dict, binding: ShardBinding | None = None) -> ArrayLayout:
        try:
            (sharding,) = doc["codecs"]
            config = sharding["configuration"]
            if sharding["name"] != "sharding_indexed" or config.get("index_location", "end") != "end":
                raise FormatError(f"array '{path}' is not sharded with the index at the end")
            layout = cls(
                path=path,
                dtype=doc["data_type"],
                shape=tuple(doc["shape"]),
                shard=tuple(doc["chunk_grid"]["configuration"]["chunk_shape"]),
                chunk=tuple(config["chunk_shape"]),
                codecs=ChunkCodecs.from_list(config["codecs"]),
                dims=tuple(doc.get("dimension_names") or ()),
                attributes=doc.get("attributes", {}),
                binding=binding,
            )
            if (
                not isinstance(layout.dtype, str)
                or not isinstance(layout.attributes, dict)
                or not all(_is_count(n) for n in (*layout.shape, *layout.shard, *layout.chunk))
            ):
                raise ValueError("data_type, shape, chunk shapes or attributes are not what zarr v3 says")
            numpy_dtype(layout.dtype)
            return layout
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FormatError(f"array '{path}': zarr.json is not a wordystore array ({exc!r})") from None


@dataclass(frozen=True)
class Profile:
    """How arrays are cut and compressed.

    - ``compact`` (default): main chunks of ``CHUNK_ROWS`` rows, step axis fastest, pcodec (which
      delta-codes along it): 4-5x smaller than the raw tensors. Readable by zarr-python (its
      ``numcodecs.pcodec``, and ``wordystore.bf16_bits`` once wordystore is imported) and zarrs.
    - ``portable``: the same cuts with codecs every zarr v3 reader has (transpose, blosc zstd,
      crc32c) and the ``bfloat16`` data type: tensorstore reads it as is.
    - ``archive``: the compact profile's codecs, with the parameters predicted from their moments
      too (:class:`wordystore.format.prediction.AdamStepPrediction`): the smallest, but reading a parameter
      decodes and replays its moments and gradients as well, so it reads several times slower.
    """

    name: str

    def __post_init__(self):
        if self.name not in PROFILES:
            raise ValueError(f"profile {self.name!r} is not one of {PROFILES}")

    def main_layout(
        self,
        name: str,
        kind: Kind,
        rows: int,
        chunk_rows: int = CHUNK_ROWS,
        prediction: Prediction | None = None,
        version: int = FORMAT_VERSION,
        binding: ShardBinding | None = None,
    ) -> ArrayLayout:
        """``prediction`` (compact and archive profiles): store the kind as residuals against it, in
        an array named for them (:func:`array_path`)."""
        predicted = prediction is not None and self.name in RESIDUAL_PROFILES
        dtype = RESIDUAL_DTYPES[kind.dtype] if predicted else stored_dtype(kind, self.name, version)
        attributes = residual_attributes(name, prediction, version) if predicted else _view_attributes(kind, dtype)
        chunk, shard = _cut(kind, chunk_rows)
        transpose = Transpose((*range(1, len(chunk)), 0)) if len(chunk) > 1 else None
        bits = BFloat16Bits() if dtype == "bfloat16" else None  # pcodec takes bfloat16 as its bits
        if predicted and self.name == "archive":  # rows first, one pcodec page each (codecs.PCodec)
            codecs = ChunkCodecs(None, PCodec(PCODEC_LEVEL, math.prod(chunk[1:])), (Crc32c(),))
        elif self.name != "portable" and (dtype in PCODEC_DTYPES or bits):
            codecs = ChunkCodecs(transpose, PCodec(PCODEC_LEVEL), (Crc32c(),), bits)
        else:
            shuffle = "bitshuffle" if name in BITSHUFFLE_KINDS else "shuffle"
            codecs = ChunkCodecs(transpose, Bytes(), (Blosc("zstd", 1, shuffle, kind.numpy_dtype.itemsize), Crc32c()))
        return ArrayLayout(
            array_path(name, "main", predicted, version),
            dtype,
            (rows, *kind.shape),
            shard,
            chunk,
            codecs,
            ("step", *kind.dims),
            attributes,
            binding,
        )

    def hot_layout(
        self,
        name: str,
        kind: Kind,
        rows: int,
        block_rows: int = BLOCK_ROWS,
        version: int = FORMAT_VERSION,
        binding: ShardBinding | None = None,
        raw: bool = True,
    ) -> ArrayLayout:
        """Hot rows: ``block_rows`` per shard. ``raw`` (what format 3 writes): the main tier's shards
        with one chunk each, raw bytes and a checksum, the cheapest to write and to read back once
        for compaction (measured against blosc lz4: docs/format.md, "Why these choices"); else the
        main tier's inner chunks in blosc lz4, as format 2 and the format-3 stores written before
        the raw hot tier hold them (:meth:`Metadata.hot_layouts`)."""
        dtype = stored_dtype(kind, self.name, version)
        chunk, shard = _cut(kind, block_rows)
        if raw:
            chunk, codecs = shard, ChunkCodecs(None, Bytes(), (Crc32c(),))
        else:
            codecs = ChunkCodecs(None, Bytes(), (Blosc("lz4", 1, "shuffle", kind.numpy_dtype.itemsize), Crc32c()))
        return ArrayLayout(
            array_path(name, "hot"),
            dtype,
            (rows, *kind.shape),
            shard,
            chunk,
            codecs,
            ("step", *kind.dims),
            _view_attributes(kind, dtype),
            binding,
        )


def _view_attributes(kind: Kind, dtype: str) -> dict:
    """Format 2's arrays of bfloat16 bits say so, for other readers."""
    return {} if dtype == kind.dtype else {ATTRS_KEY: {"view_as": kind.dtype}}


def _cut(kind: Kind, rows: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(inner chunk, shard) shapes: ``rows`` rows; the first per-step axis cut into pieces of
    about ``CHUNK_BYTES`` per ``CHUNK_ROWS`` rows (the same cut in both tiers), ``CHUNKS_PER_SHARD``
    of them per shard, so shards split along the token axis (room for one writer per token
    range); other axes whole."""
    if not kind.shape:
        return (rows,), (rows,)
    first, rest = kind.shape[0], kind.shape[1:]
    row_bytes = max(1, int(np.prod(rest, dtype=np.int64)) * kind.numpy_dtype.itemsize)
    per_chunk = max(1, min(first, CHUNK_BYTES // (CHUNK_ROWS * row_bytes)))
    per_chunk = 1 << (per_chunk.bit_length() - 1) if per_chunk < first else first  # a power of two
    per_shard = min(per_chunk * CHUNKS_PER_SHARD, math.ceil(first / per_chunk) * per_chunk)
    rest = tuple(max(1, n) for n in rest)
    return (rows, per_chunk, *rest), (rows, per_shard, *rest)


def token_set_layout(name: str, size: int, binding: ShardBinding | None = None) -> ArrayLayout:
    """``token_sets/<name>``: int64 ids in chunks of 65,536 with blosc and crc32c, like any data."""
    chunk = max(1, min(size, 65536))
    codecs = ChunkCodecs(None, Bytes(), (Blosc("zstd", 1, "shuffle", 8), Crc32c()))
    return ArrayLayout(token_set_path(name), "int64", (size,), (chunk,), (chunk,), codecs, ("token",), {}, binding)


def is_token_set_layout(layout: ArrayLayout, name: str) -> bool:
    """Exactly a token set's layout: an edited shape must not read as a shorter set."""
    return len(layout.shape) == 1 and _is_count(layout.shape[0]) and layout == token_set_layout(name, layout.shape[0])


def _is_count(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def check_predictions(predictions: dict[str, Prediction], kinds: dict[str, Kind], profile: str = "compact") -> None:
    """Each prediction rebuilds a bfloat16 or float32 kind from other arrays of the store: its first
    ``TENSORS`` inputs kinds of the kind's shape and dtype, the others 0-d arrays (a value per row),
    without a cycle through other predicted kinds (a reader would never finish). A parameter is
    predicted from its moments (:class:`AdamStepPrediction`) in the archive profile, and only there:
    it reads several times slower."""
    arrays = {**kinds, STEPS_ARRAY: STEPS_KIND}
    for name, p in predictions.items():
        kind = kinds.get(name)
        shaped = [arrays.get(i) for i in p.inputs[: p.TENSORS]]
        rows = [arrays.get(i) for i in p.inputs[p.TENSORS :]]
        if (
            kind is None
            or kind.dtype not in RESIDUAL_DTYPES
            or name in p.inputs
            or not all(a is not None and a.shape == kind.shape and a.dtype == kind.dtype for a in shaped)
            or not all(a is not None and a.shape == () and a.dtype != "bool" for a in rows)
        ):
            raise ValueError(
                f"prediction of {name!r} needs kinds {[name, *p.inputs[: p.TENSORS]]} of one shape and one "
                f"dtype, bfloat16 or float32, and 0-d arrays {list(p.inputs[p.TENSORS :])}; the kinds are "
                f"{sorted(kinds)}"
            )
        if isinstance(p, AdamStepPrediction) and arrays[p.steps].dtype not in INTEGER_DTYPES:
            raise ValueError(
                f"prediction of {name!r} reads the steps from {p.steps!r}, which is "
                f"{arrays[p.steps].dtype}; steps are integers"
            )
    for name in predictions:
        _check_acyclic(name, predictions, ())
    parameters = sorted(name for name, p in predictions.items() if isinstance(p, AdamStepPrediction))
    if parameters and profile != "archive":
        raise ValueError(
            f"kinds {parameters} are predicted from their moments, which only the archive profile does "
            f"(reading them replays their moments too); the profile is {profile!r}"
        )
    if profile == "archive" and not parameters:
        raise ValueError(
            "the archive profile predicts a parameter from its moments: give predictions="
            "wordystore.archive_predictions(...), or use the compact profile"
        )


def _check_acyclic(name: str, predictions: dict[str, Prediction], path: tuple[str, ...]) -> None:
    """No predicted kind is rebuilt, through the kinds it reads, from itself."""
    if name in path:
        raise ValueError(f"predictions read each other in a cycle: {' -> '.join((*path, name))}")
    for source in predictions[name].inputs if name in predictions else ():
        _check_acyclic(source, predictions, (*path, name))


def check_rows(block_rows: int, chunk_rows: int) -> None:
    """Hot blocks must tile main chunks: ``block_rows`` divides ``chunk_rows`` (at most ``MAX_CHUNK_ROWS``)."""
    if (
        not all(_is_count(n) and n >= 1 for n in (block_rows, chunk_rows))
        or chunk_rows % block_rows
        or chunk_rows > MAX_CHUNK_ROWS
    ):
        raise ValueError(
            f"block_rows {block_rows!r} must be a positive int dividing chunk_rows {chunk_rows!r} "
            f"(at most {MAX_CHUNK_ROWS})"
        )


def check_kinds(kinds: Mapping[str, Kind]) -> None:
    """Kinds a store can hold: allowed names, no axis of length 0, rows of at most ``MAX_ROW_BYTES``, one token
    axis length."""
    for name, kind in kinds.items():
        check_kind_name(name)
        if 0 in kind.shape:  # nothing to store, and no chunk grid to cut it into
            raise ValueError(f"kind {name!r} has shape {list(kind.shape)}; a kind's axes are at least 1 long")
        if kind.step_nbytes > MAX_ROW_BYTES:
            raise ValueError(
                f"kind {name!r} of shape {list(kind.shape)} takes {kind.step_nbytes} bytes a row; "
                f"a row of a kind takes at most {MAX_ROW_BYTES}"
            )
    vocab_size(kinds)
