"""The wordystore trajectory format, version 3: its facts, as small typed pieces, without I/O.

``docs/format.md`` is the specification; this module is where its facts live, each once: the
store's key names, the names a kind may take, the limits on what a document may claim, the
metadata document (:class:`Metadata`), the commit record (:class:`CommitRecord`) and the tier rule
it implies (:class:`RowTiers`), the two profiles (:class:`Profile`), the per-array encodings
(:class:`ArrayLayout`), what format 2 (still read, never written) does differently, and the
checks on each. Beside it, also pure: :mod:`wordystore.codecs` (the codecs, the shard index and
binding record),
:mod:`wordystore.prediction` (the optimizer's replays) and :mod:`wordystore.kinds` (the dtypes). Reading and
writing the documents is :mod:`wordystore.documents`; the resume-state record is
:mod:`wordystore.resume_state`.

A trajectory keeps each kind in two tiers of zarr v3 arrays with the same row axis:

- the **hot** tier (``hot/<kind>``): rows as the writer wrote them, ``block_rows`` at a time,
  raw (bytes and a checksum, one chunk a shard), so the writer holds only a block or a few in
  memory;
- the **main** tier (``<kind>``): rows compacted into long chunks of ``chunk_rows`` rows with the
  profile's codec, which is what makes the store small.

The commit record says how many rows are committed and how many of those are compacted: rows
below ``compacted_rows`` are read from the main tier, the rest from the hot tier (:class:`RowTiers`).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator, Mapping

import numpy as np

from wordystore.codecs import (
    BFloat16Bits,
    Blosc,
    Bytes,
    ChunkCodecs,
    Crc32c,
    PCodec,
    ShardBinding,
    ShardTail,
    Transpose,
    encode_shard,
)
from wordystore.errors import FormatError
from wordystore.kinds import Kind, numpy_dtype
from wordystore.prediction import AdamStepPrediction, Prediction, prediction_from_json

FORMAT_NAME = "wordystore.trajectory"
FORMAT_VERSION = 3  # what this wordystore writes
READ_VERSIONS = (2, 3)  # what it reads; format 2 differs as the functions taking ``version`` say
ATTRS_KEY = "wordystore"  # root group attribute holding the metadata document

# -- limits: what a document may claim, checked before anything is allocated or enumerated --------------

MAX_ROWS = 2**40  # rows (recorded steps) of a store
MAX_ROW_BYTES = 2**38  # bytes of one row of one kind (256 GiB)
MAX_CHUNK_ROWS = 2**12  # rows per main chunk
MAX_DOCUMENT_BYTES = 2**26  # a JSON document (64 MiB)
MAX_STATE_BYTES = 2**36  # a resume state's safetensors file (64 GiB)
MAX_NAME_LENGTH = 128  # a kind's or token set's name: one path component

# -- keys (docs/format.md, "Keys") -------------------------------------------------------------------

ZARR_JSON = "zarr.json"  # a group's or an array's document; the root's holds the metadata
COMMIT_KEY = "commit.json"  # the commit record, a JSON document at the store's root
VERIFIED_KEY = "verified.json"  # the outcome of the last `wordystore verify`
STEPS_ARRAY = "recorded_steps"  # int64 [row]: the training step each row holds
TOKEN_SETS_GROUP = "token_sets"
HOT_GROUP = "hot"
STATE_PREFIX = "state"  # resume states: state/<row>.safetensors (wordystore.resume_state)
ANALYSIS_PREFIX = "analysis"  # cached analysis results: analysis/<name>-<digest>.json
WRITER_LOCK_KEY = ".wordystore-writer.lock"  # a directory's flock file; an object store's lease (LeaseRecord)
CHUNK_DIR = "c"  # chunk key encoding "default" with "/": <array>/c/<i>/<j>/...
RESERVED_NAMES = frozenset({STEPS_ARRAY, TOKEN_SETS_GROUP, COMMIT_KEY, ZARR_JSON, ANALYSIS_PREFIX, HOT_GROUP,
                            STATE_PREFIX, VERIFIED_KEY})  # the store root's keys: no kind may take them
NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")  # a kind's or token set's name: one path component
RESIDUALS_SUFFIX = ".residuals"  # format 3: the main array of a predicted kind is <kind>.residuals
GROUP_JSON = {"zarr_format": 3, "node_type": "group", "attributes": {}}  # a plain group's zarr.json
TIERS = ("main", "hot")
STEPS_KIND = Kind((), "int64", ())
STATE_KEY = re.compile(rf"^{STATE_PREFIX}/\d{{12,20}}\.safetensors$")  # state/<row, 12 digits>.safetensors


def document_key(path: str) -> str:
    """The key of the ``zarr.json`` of the group or array at ``path`` (``""``: the root)."""
    return f"{path}/{ZARR_JSON}" if path else ZARR_JSON


def array_path(name: str, tier: str = "main", predicted: bool = False, version: int = FORMAT_VERSION) -> str:
    """Where array ``name`` (a kind or ``recorded_steps``) of ``tier`` lives: ``name`` or ``hot/name``;
    a predicted kind's main array, whose values are residuals, is ``name.residuals`` (format 2: ``name``)."""
    if tier == "hot":
        return f"{HOT_GROUP}/{name}"
    return f"{name}{RESIDUALS_SUFFIX}" if predicted and version >= 3 else name


def token_set_path(name: str) -> str:
    return f"{TOKEN_SETS_GROUP}/{name}"


def is_chunk_key(key: str) -> bool:
    """Whether ``key`` holds chunk bytes (a shard) rather than a document."""
    return f"/{CHUNK_DIR}/" in key


def state_key(row: int) -> str:
    """Where the resume state kept with row ``row`` lives."""
    return f"{STATE_PREFIX}/{row:012d}.safetensors"


def is_state_key(key) -> bool:
    return isinstance(key, str) and STATE_KEY.match(key) is not None


def check_kind_name(name: str, what: str = "kind") -> str:
    """A kind's or token set's name: one path component of letters, digits, ``_.-`` (starting with
    a letter or ``_``), none of the root's keys, not ending in ``.residuals``."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or name in RESERVED_NAMES \
            or len(name) > MAX_NAME_LENGTH or name.endswith(RESIDUALS_SUFFIX):
        raise ValueError(
            f"{what} name {name!r} is not allowed: use up to {MAX_NAME_LENGTH} letters, digits, '_', '.', '-' "
            f"(starting with a letter or '_'), not ending in '{RESIDUALS_SUFFIX}', and none of {sorted(RESERVED_NAMES)}"
        )
    return name


# -- what the kinds imply -----------------------------------------------------------------------------


def vocab_size(kinds: Mapping[str, Kind]) -> int | None:
    """Length of the ``token`` axis shared by the kinds that have one (None if none has);
    ValueError if they disagree."""
    lengths = {k.shape[k.dims.index("token")] for k in kinds.values() if "token" in k.dims}
    if len(lengths) > 1:
        raise ValueError(f"kinds disagree on the length of the token axis: {sorted(lengths)}")
    return lengths.pop() if lengths else None


def is_token_set(ids: np.ndarray, vocab: int | None) -> bool:
    """A token set is sorted, unique ids in ``[0, vocab)`` (any non-negative id without a token axis)."""
    return not ids.size or bool(np.all(np.diff(ids) > 0) and ids[0] >= 0 and (vocab is None or ids[-1] < vocab))


def check_config(config) -> None:
    """The run's config is stored as JSON, without NaN."""
    try:
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config must be JSON-serialisable (no NaN): {exc}") from None


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

    @property
    def chunks_per_shard(self) -> tuple[int, ...]:
        return tuple(s // c for s, c in zip(self.shard, self.chunk))

    @property
    def n_chunks(self) -> int:
        """Inner chunks per shard."""
        return math.prod(self.chunks_per_shard)

    @property
    def tail_nbytes(self) -> int:
        """Bytes of a shard's tail: its index, and its binding record if bound."""
        return ShardTail.nbytes(self.n_chunks, self.binding is not None)

    @property
    def max_chunk_nbytes(self) -> int:
        """The most bytes an encoded inner chunk may take: no codec of a chain doubles its input."""
        return 2 * math.prod(self.chunk) * self.numpy_dtype.itemsize + 4096

    @property
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

    def with_rows(self, rows: int) -> "ArrayLayout":
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
        chunks = [self.codecs.encode(data[tuple(slice(a, a + c) for a, c in zip(corner, self.chunk))])
                  for corner in itertools.product(*grid)]
        return encode_shard(chunks, self.binding, self.shard_key(coords), rows)

    def decode_tail(self, tail, key: str) -> ShardTail:
        """The tail (last :attr:`tail_nbytes` bytes) of the shard at ``key``, checked."""
        return ShardTail.decode(tail, self.n_chunks, self.binding, key)

    def to_zarr_json(self) -> dict:
        return {
            "zarr_format": 3,
            "node_type": "array",
            "shape": list(self.shape),
            "data_type": self.dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(self.shard)}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": 0,
            "codecs": [{
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": list(self.chunk),
                    "codecs": self.codecs.to_list(),
                    "index_codecs": [Bytes().to_dict(), Crc32c().to_dict()],
                    "index_location": "end",
                },
            }],
            "attributes": self.attributes,
            "dimension_names": list(self.dims),
        }

    @classmethod
    def from_zarr_json(cls, path: str, doc: dict, binding: ShardBinding | None = None) -> "ArrayLayout":
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
            if not isinstance(layout.dtype, str) or not isinstance(layout.attributes, dict) \
                    or not all(_is_count(n) for n in (*layout.shape, *layout.shard, *layout.chunk)):
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
      too (:class:`wordystore.prediction.AdamStepPrediction`): the smallest, but reading a parameter
      decodes and replays its moments and gradients as well, so it reads several times slower.
    """

    name: str

    def __post_init__(self):
        if self.name not in PROFILES:
            raise ValueError(f"profile {self.name!r} is not one of {PROFILES}")

    def main_layout(self, name: str, kind: Kind, rows: int, chunk_rows: int = CHUNK_ROWS,
                    prediction: Prediction | None = None, version: int = FORMAT_VERSION,
                    binding: ShardBinding | None = None) -> ArrayLayout:
        """``prediction`` (compact and archive profiles): store the kind as residuals against it, in
        an array named for them (:func:`array_path`)."""
        predicted = prediction is not None and self.name in RESIDUAL_PROFILES
        dtype = "int16" if predicted else stored_dtype(kind, self.name, version)
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
        return ArrayLayout(array_path(name, "main", predicted, version), dtype, (rows, *kind.shape), shard, chunk,
                           codecs, ("step", *kind.dims), attributes, binding)

    def hot_layout(self, name: str, kind: Kind, rows: int, block_rows: int = BLOCK_ROWS,
                   version: int = FORMAT_VERSION, binding: ShardBinding | None = None, raw: bool = True) -> ArrayLayout:
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
        return ArrayLayout(array_path(name, "hot"), dtype, (rows, *kind.shape), shard, chunk, codecs,
                           ("step", *kind.dims), _view_attributes(kind, dtype), binding)


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
    """Each prediction rebuilds a bfloat16 kind from other arrays of the store: its first
    ``TENSORS`` inputs bfloat16 kinds of the kind's shape, the others 0-d arrays (a value per row),
    without a cycle through other predicted kinds (a reader would never finish). A parameter is
    predicted from its moments (:class:`AdamStepPrediction`) in the archive profile, and only there:
    it reads several times slower."""
    arrays = {**kinds, STEPS_ARRAY: STEPS_KIND}
    for name, p in predictions.items():
        kind = kinds.get(name)
        shaped = [arrays.get(i) for i in p.inputs[: p.TENSORS]]
        rows = [arrays.get(i) for i in p.inputs[p.TENSORS:]]
        if kind is None or kind.dtype != "bfloat16" or name in p.inputs \
                or not all(a is not None and a.shape == kind.shape and a.dtype == "bfloat16" for a in shaped) \
                or not all(a is not None and a.shape == () and a.dtype != "bool" for a in rows):
            raise ValueError(f"prediction of {name!r} needs bfloat16 kinds {[name, *p.inputs[: p.TENSORS]]} of one shape "
                             f"and 0-d arrays {list(p.inputs[p.TENSORS:])}; the kinds are {sorted(kinds)}")
        if isinstance(p, AdamStepPrediction) and arrays[p.steps].dtype not in INTEGER_DTYPES:
            raise ValueError(f"prediction of {name!r} reads the steps from {p.steps!r}, which is "
                             f"{arrays[p.steps].dtype}; steps are integers")
    for name in predictions:
        _check_acyclic(name, predictions, ())
    parameters = sorted(name for name, p in predictions.items() if isinstance(p, AdamStepPrediction))
    if parameters and profile != "archive":
        raise ValueError(f"kinds {parameters} are predicted from their moments, which only the archive profile does "
                         f"(reading them replays their moments too); the profile is {profile!r}")
    if profile == "archive" and not parameters:
        raise ValueError("the archive profile predicts a parameter from its moments: give predictions="
                         "wordystore.archive_predictions(...), or use the compact profile")


def _check_acyclic(name: str, predictions: dict[str, Prediction], path: tuple[str, ...]) -> None:
    """No predicted kind is rebuilt, through the kinds it reads, from itself."""
    if name in path:
        raise ValueError(f"predictions read each other in a cycle: {' -> '.join((*path, name))}")
    for source in predictions[name].inputs if name in predictions else ():
        _check_acyclic(source, predictions, (*path, name))


def check_rows(block_rows: int, chunk_rows: int) -> None:
    """Hot blocks must tile main chunks: ``block_rows`` divides ``chunk_rows`` (at most ``MAX_CHUNK_ROWS``)."""
    if not all(_is_count(n) and n >= 1 for n in (block_rows, chunk_rows)) or chunk_rows % block_rows \
            or chunk_rows > MAX_CHUNK_ROWS:
        raise ValueError(f"block_rows {block_rows!r} must be a positive int dividing chunk_rows {chunk_rows!r} "
                         f"(at most {MAX_CHUNK_ROWS})")


def check_kinds(kinds: Mapping[str, Kind]) -> None:
    """Kinds a store can hold: allowed names, rows of at most ``MAX_ROW_BYTES``, one token axis length."""
    for name, kind in kinds.items():
        check_kind_name(name)
        if kind.step_nbytes > MAX_ROW_BYTES:
            raise ValueError(f"kind {name!r} of shape {list(kind.shape)} takes {kind.step_nbytes} bytes a row; "
                             f"a row of a kind takes at most {MAX_ROW_BYTES}")
    vocab_size(kinds)


# -- the documents --------------------------------------------------------------------------------------

STORE_ID = re.compile(r"^[0-9a-f]{32}$")  # format 3: a store's random id, which its shards are bound to


@dataclass(frozen=True)
class Metadata:
    """The root group's ``attributes.wordystore``: what the trajectory records and how. From
    format 3, ``store_id`` (32 random hex digits, chosen at creation) is what every shard of the
    store is bound to (:class:`wordystore.codecs.ShardBinding`)."""

    kinds: dict[str, Kind]
    profile: str
    token_sets: tuple[str, ...]
    config: dict
    created: str
    versions: dict
    block_rows: int = BLOCK_ROWS
    chunk_rows: int = CHUNK_ROWS
    predictions: dict[str, Prediction] = field(default_factory=dict)
    store_id: str | None = None
    format_version: int = FORMAT_VERSION

    @property
    def binding(self) -> ShardBinding | None:
        """What this store's shards are bound to; None in format 2, whose shards are not."""
        return ShardBinding(self.store_id) if self.format_version >= 3 else None

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            **({"store_id": self.store_id} if self.format_version >= 3 else {}),
            "profile": self.profile,
            "block_rows": self.block_rows,
            "chunk_rows": self.chunk_rows,
            "created": self.created,
            "kinds": {name: kind.to_json() for name, kind in self.kinds.items()},
            "token_sets": list(self.token_sets),
            "predictions": {name: p.to_json() for name, p in self.predictions.items()},
            "config": self.config,
            "versions": self.versions,
        }

    def to_root_json(self) -> dict:
        """The root group's ``zarr.json``, which holds this document."""
        return {**GROUP_JSON, "attributes": {ATTRS_KEY: self.to_json()}}

    @classmethod
    def from_root_json(cls, root, where: str) -> "Metadata":
        if not isinstance(root, dict) or root.get("node_type") != "group":
            raise FormatError(f"{where} is not a wordystore trajectory: its zarr.json is not a zarr group's")
        attributes = root.get("attributes")
        return cls.from_json(attributes.get(ATTRS_KEY) if isinstance(attributes, dict) else None, where)

    @classmethod
    def from_json(cls, doc, where: str) -> "Metadata":
        """The metadata document, every field checked (names, counts, limits) before anything
        relies on it; a FormatError naming the first field that is wrong."""
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise FormatError(f"{where} is a zarr group but not a wordystore trajectory (no '{ATTRS_KEY}' attributes)")
        version = doc.get("format_version")
        if version == 1:
            raise FormatError(f"{where} is a format-1 trajectory; convert it with: wordystore convert {where} NEW.zarr")
        if version not in READ_VERSIONS or isinstance(version, bool):
            raise FormatError(f"{where} has format version {version!r}; this wordystore reads versions "
                              f"{' and '.join(map(str, READ_VERSIONS))}")
        field_name = "kinds"
        try:
            kinds = {}
            for name, spec in _mapping(doc.get("kinds")).items():
                field_name = f"kinds[{name!r}]"
                kinds[name] = Kind.from_json(spec)
            field_name = "kinds"
            check_kinds(kinds)
            field_name = "token_sets"
            token_sets = tuple(doc.get("token_sets"))
            for name in token_sets:
                check_kind_name(name, "token set")
            if len(set(token_sets)) != len(token_sets):
                raise ValueError(f"names {list(token_sets)} repeat")
            field_name = "profile"
            profile = Profile(doc.get("profile")).name
            field_name = "predictions"
            predictions = {name: prediction_from_json(p) for name, p in _mapping(doc.get("predictions", {})).items()}
            check_predictions(predictions, kinds, profile)
            field_name = "block_rows and chunk_rows"
            check_rows(doc.get("block_rows"), doc.get("chunk_rows"))
            field_name = "store_id"
            store_id = doc.get("store_id")
            if version >= 3 and not (isinstance(store_id, str) and STORE_ID.match(store_id)):
                raise ValueError(f"{store_id!r} is not 32 hex digits")
            field_name = "config, created and versions"
            config, created, versions = _mapping(doc.get("config")), doc.get("created"), _mapping(doc.get("versions", {}))
            if not isinstance(created, str):
                raise ValueError(f"created is {created!r}, not a time")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FormatError(f"{where}: the metadata document is damaged: {field_name}: {exc}") from None
        return cls(kinds, profile, token_sets, config, created, versions, doc["block_rows"], doc["chunk_rows"],
                   predictions, store_id, version)

    def arrays(self) -> dict[str, Kind]:
        """Every per-row array: the kinds and ``recorded_steps``."""
        return {**self.kinds, STEPS_ARRAY: STEPS_KIND}

    def layouts(self, name: str, rows: int = 0) -> tuple[ArrayLayout, ArrayLayout]:
        """The (main, hot) layouts this metadata determines for array ``name`` with ``rows`` rows
        (the hot one as a new array of it is written: :meth:`hot_layouts`)."""
        kind, profile, version, binding = self.arrays()[name], Profile(self.profile), self.format_version, self.binding
        return (profile.main_layout(name, kind, rows, self.chunk_rows, self.predictions.get(name), version, binding),
                self.hot_layouts(name, rows)[0])

    def hot_layouts(self, name: str, rows: int = 0) -> tuple[ArrayLayout, ...]:
        """Every hot layout a store of this metadata may hold for array ``name``, the one a new array
        is written in first: format 3 writes the raw hot tier, and its stores written before it
        have blosc lz4 hot arrays, read and appended to as they are; format 2's are lz4."""
        kind, profile, version = self.arrays()[name], Profile(self.profile), self.format_version
        return tuple(profile.hot_layout(name, kind, rows, self.block_rows, version, self.binding, raw)
                     for raw in ((True, False) if version >= 3 else (False,)))

    def token_set_layout(self, name: str, size: int) -> ArrayLayout:
        return token_set_layout(name, size, self.binding)


def _mapping(value) -> dict:
    if not isinstance(value, dict):
        raise TypeError(f"{type(value).__name__} where a JSON object belongs")
    return value


def check_writable(meta: Metadata, where: str) -> None:
    """Only stores of this format version are appended to: older ones are read, verified and converted."""
    if meta.format_version != FORMAT_VERSION:
        raise FormatError(f"{where} is a format-{meta.format_version} trajectory, which this wordystore reads but "
                          f"does not append to; `wordystore convert {where} NEW.zarr` writes it as format "
                          f"{FORMAT_VERSION} (rows, token sets, config and its newest resume state, bit for bit)")


def layout_mismatch(actual: ArrayLayout, expected: ArrayLayout) -> str | None:
    """How an array's zarr.json disagrees with the layout the metadata determines (None if it agrees:
    the same data type, shape per row, shards, inner chunks, codecs, dimension names and prediction)."""
    if len(actual.shape) != len(expected.shape) or not (len(actual.chunk) == len(actual.shard) == len(actual.shape)):
        return (f"has shape {list(actual.shape)}, shards {list(actual.shard)} and chunks {list(actual.chunk)}; "
                f"expected {len(expected.shape)} axes")
    try:
        prediction = actual.prediction
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return f"has a damaged prediction attribute ({exc!r})"
    checks = {
        "data type": (actual.dtype, expected.dtype),
        "shape per row": (actual.shape[1:], expected.shape[1:]),
        "dimension names": (actual.dims, expected.dims),
        "rows per chunk and shard": ((actual.chunk[0], actual.shard[0]), (expected.chunk[0], expected.shard[0])),
        "shards and chunks": ((actual.shard[1:], actual.chunk[1:]), (expected.shard[1:], expected.chunk[1:])),
        "transpose": (actual.codecs.transpose, expected.codecs.transpose),
        "serializer": (type(actual.codecs.serializer).__name__, type(expected.codecs.serializer).__name__),
        "codecs": (actual.codecs.to_list(), expected.codecs.to_list()),
        "prediction": (prediction, expected.prediction),
    }
    for what, (got, want) in checks.items():
        if got != want:
            return f"has {what} {got}; the metadata says {want}"
    return None


def array_mismatch(meta: Metadata, tier: str, name: str, actual: ArrayLayout) -> str | None:
    """How array ``name``'s zarr.json in ``tier`` disagrees with the layouts the metadata allows
    there (None if it agrees with one): the main layout, or one of :meth:`Metadata.hot_layouts`."""
    allowed = (meta.layouts(name)[0],) if tier == "main" else meta.hot_layouts(name)
    problems = [layout_mismatch(actual, expected) for expected in allowed]
    return None if None in problems else problems[0]


def _extents(layout: ArrayLayout, keys: Iterable[str]) -> list[int] | None:
    """Per axis, one past the largest coordinate of the shards of ``layout`` among ``keys`` (None: none)."""
    coords = [c for c in map(layout.shard_coords, keys) if c is not None]
    return [max(axis) + 1 for axis in zip(*coords)] if coords else None


def rows_held(layouts: Iterable[ArrayLayout], keys: list[str]) -> int:
    """The rows the shards present (``keys``) of these layouts of one array can hold at most."""
    extents = [(layout, _extents(layout, keys)) for layout in layouts]
    return max([extent[0] * layout.shard[0] for layout, extent in extents if extent] + [0])


def rows_problem(name: str, pair: tuple[ArrayLayout, ArrayLayout], record: "CommitRecord",
                 keys: list[str]) -> str | None:
    """Whether the shards present (``keys``) of array ``name``'s (main, hot) tiers can hold the rows
    the record admits (None if they can). A bound on what the record claims, checked before anything
    is allocated or enumerated by it; a missing shard below it is found when read. List the hot
    tier's shards before the main tier's: a compaction deleting hot shards meanwhile has written
    their main ones."""
    held = rows_held(pair, keys)
    if record.committed_rows <= held:
        return None
    layout = pair[0] if held < record.compacted_rows else pair[1]
    first = layout.shard_key((held // layout.shard[0],) + (0,) * (len(layout.shape) - 1))
    return (f"{COMMIT_KEY} admits {record.committed_rows} rows but the shards of array '{name}' hold at most {held} "
            f"('{first}' is missing)")


def width_problem(name: str, layouts: Iterable[ArrayLayout], keys: list[str]) -> str | None:
    """Whether the shards present (``keys``) of array ``name`` reach across the shape per row the
    metadata declares (None if they do, or if there are none: an empty array is read as nothing)."""
    layouts = list(layouts)
    extents = [extent for extent in (_extents(layout, keys) for layout in layouts) if extent]
    if not extents:
        return None
    layout = layouts[0]
    for axis, needed in enumerate(layout.shard_grid()[1:], start=1):
        have = max(extent[axis] for extent in extents)
        if needed > have:
            return (f"array '{name}' is {layout.shape[axis]} long along '{layout.dims[axis]}' (the metadata's "
                    f"kinds[{name!r}].shape is {list(layout.shape[1:])}): {needed} shards, but its shards present "
                    f"cover {have}")
    return None


@dataclass(frozen=True)
class RowTiers:
    """The tier rule (docs/format.md, "Two tiers, one row axis"): of the committed rows, those below
    ``compacted_rows`` are read from the main tier, the rest from the hot tier."""

    compacted_rows: int
    committed_rows: int

    def span(self, tier: str) -> tuple[int, int]:
        """Rows ``[start, stop)`` that ``tier`` ("main" or "hot") holds."""
        if tier == "main":
            return 0, self.compacted_rows
        return self.compacted_rows, self.committed_rows


def state_entry_problem(entry, version: int = FORMAT_VERSION) -> str | None:
    """Why a commit record's ``states`` entry is not one (None if it is): ``{"row", "step", "key"}``,
    the key the row's (:func:`state_key`), and from format 3 the state file's ``crc32c`` and
    ``nbytes``, which a reader checks before trusting it."""
    fields = ("row", "step", "key", *(("crc32c", "nbytes") if version >= 3 else ()))
    if not isinstance(entry, dict) or not set(fields) <= set(entry):
        return f"is not an object with {', '.join(fields)}"
    row, step, key = entry["row"], entry["step"], entry["key"]
    if not (_is_count(row) and row < MAX_ROWS and _is_count(step)):
        return f"has row {row!r} and step {step!r}; expected counts"
    if key != state_key(row):
        return f"has key {key!r}; the state of row {row} is {state_key(row)!r}"
    if version >= 3 and not (_is_count(entry["crc32c"]) and entry["crc32c"] < 2**32
                             and _is_count(entry["nbytes"]) and entry["nbytes"] <= MAX_STATE_BYTES):
        return (f"has crc32c {entry['crc32c']!r} and nbytes {entry['nbytes']!r}; expected a CRC-32C and a size of at "
                f"most {MAX_STATE_BYTES} bytes")
    return None


@dataclass(frozen=True)
class CommitRecord:
    """``commit.json``: rows ``[0, committed_rows)`` are valid; ``[0, compacted_rows)`` of them
    are in the main tier, the rest in the hot tier. ``states`` lists the resume states kept
    (``{"row", "step", "key", "crc32c", "nbytes"}``, oldest first; see :mod:`wordystore.resume_state`).
    ``writer_generation``: on object storage, the lease generation of the writer that wrote it
    (:class:`LeaseRecord`); absent (0) on directories. ``writer`` says how the writer that made the
    record was sized (:class:`wordystore.pools.WriterPools`). Readers ignore both."""

    committed_rows: int = 0
    compacted_rows: int = 0
    last_step: int | None = None
    states: tuple[dict, ...] = ()
    format_version: int = FORMAT_VERSION
    writer_generation: int = 0
    writer: dict | None = field(default=None, compare=False)

    @property
    def tiers(self) -> RowTiers:
        return RowTiers(self.compacted_rows, self.committed_rows)

    def to_json(self) -> dict:
        doc = {"format": FORMAT_NAME, "format_version": self.format_version, "committed_rows": self.committed_rows,
               "compacted_rows": self.compacted_rows, "last_step": self.last_step, "states": list(self.states)}
        if self.writer_generation:
            doc["writer_generation"] = self.writer_generation
        if self.writer is not None:
            doc["writer"] = self.writer
        return doc

    @classmethod
    def from_json(cls, doc, where: str) -> "CommitRecord":
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise FormatError(f"{where}/{COMMIT_KEY} is not a wordystore commit record")
        version = doc.get("format_version")
        if version not in READ_VERSIONS or isinstance(version, bool):
            raise FormatError(f"{where}/{COMMIT_KEY} has format version {version!r}; this wordystore reads versions "
                              f"{' and '.join(map(str, READ_VERSIONS))}")
        committed, compacted = doc.get("committed_rows"), doc.get("compacted_rows")
        last, states = doc.get("last_step"), doc.get("states", [])
        if not (_is_count(committed) and _is_count(compacted) and compacted <= committed <= MAX_ROWS):
            raise FormatError(f"{where}/{COMMIT_KEY} is damaged: committed_rows {committed!r} and compacted_rows "
                              f"{compacted!r} must be counts with compacted <= committed <= {MAX_ROWS}")
        if (last is None) != (committed == 0) or (last is not None and not _is_count(last)):
            raise FormatError(f"{where}/{COMMIT_KEY} is damaged: last_step {last!r} with {committed} rows")
        if not isinstance(states, list):
            raise FormatError(f"{where}/{COMMIT_KEY} is damaged: states is {states!r}, not a list")
        for i, entry in enumerate(states):
            problem = state_entry_problem(entry, version)
            if problem:
                raise FormatError(f"{where}/{COMMIT_KEY} is damaged: states[{i}] {problem}")
        generation = doc.get("writer_generation", 0)
        if not (_is_count(generation) and generation <= MAX_LEASE_GENERATION):
            raise FormatError(f"{where}/{COMMIT_KEY} is damaged: writer_generation {generation!r} is not a count of "
                              f"at most {MAX_LEASE_GENERATION}")
        writer = doc.get("writer")
        return cls(committed, compacted, last, tuple(states), version, generation,
                   writer if isinstance(writer, dict) else None)


# -- the writer lease on object storage (docs/format.md, "Object storage") ----------------------------

MAX_LEASE_GENERATION = 2**53  # exact in every JSON reader
MAX_OWNER_LENGTH = 256


@dataclass(frozen=True)
class LeaseRecord:
    """The object ``.wordystore-writer.lock`` of a store on object storage: which writer holds it
    (``owner``, ``host:pid:random``), its ``generation`` (1 for the first writer, one more for each
    writer that takes it over: the fencing token ``commit.json`` carries), until when (``expires_at``,
    Unix seconds; 0 once released) and for how long each renewal extends it (``duration_s``)."""

    owner: str
    generation: int
    expires_at: float
    duration_s: float

    def to_json(self) -> dict:
        return {"owner": self.owner, "generation": self.generation, "expires_at": self.expires_at,
                "duration_s": self.duration_s}

    @classmethod
    def from_json(cls, doc, where: str) -> "LeaseRecord":
        owner, generation = (doc.get(k) if isinstance(doc, dict) else None for k in ("owner", "generation"))
        expires_at, duration = (doc.get(k) if isinstance(doc, dict) else None for k in ("expires_at", "duration_s"))
        numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
                      for x in (expires_at, duration))
        if not (isinstance(owner, str) and 0 < len(owner) <= MAX_OWNER_LENGTH and _is_count(generation)
                and 0 < generation <= MAX_LEASE_GENERATION and numbers):
            raise FormatError(f"{where}/{WRITER_LOCK_KEY} is not a writer lease: expected owner (at most "
                              f"{MAX_OWNER_LENGTH} characters), generation (1 to {MAX_LEASE_GENERATION}), expires_at "
                              "and duration_s (seconds); delete it once no writer runs")
        return cls(owner, generation, float(expires_at), float(duration))


def check_arrays(where: str, meta: Metadata, record: CommitRecord,
                 layouts: dict[str, tuple[ArrayLayout, ArrayLayout]]) -> None:
    """The arrays (name -> (main, hot) layouts) of the store ``where`` agree with the metadata and
    hold every row the record admits in their tier; else a FormatError naming the first that does not."""
    if record.format_version != meta.format_version:
        raise FormatError(f"{where}: {COMMIT_KEY} is of format {record.format_version} but the metadata of format "
                          f"{meta.format_version}; run `wordystore verify {where}`")
    for name, pair in layouts.items():
        for tier, actual in zip(TIERS, pair):
            mismatch = array_mismatch(meta, tier, name, actual)
            if mismatch:
                raise FormatError(f"{where}: array '{actual.path}': its zarr.json {mismatch}; "
                                  f"run `wordystore verify {where}`")
        main, hot = pair
        if any(start < stop and layout.shape[0] < stop
               for layout, (start, stop) in zip(pair, map(record.tiers.span, TIERS))):
            raise FormatError(
                f"{where}: {COMMIT_KEY} admits {record.committed_rows} rows ({record.compacted_rows} compacted) but "
                f"array '{name}' holds {main.shape[0]} compacted and {hot.shape[0]} hot rows; "
                f"run `wordystore verify {where} --repair`")
