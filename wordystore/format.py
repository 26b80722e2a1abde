"""The wordystore trajectory format, version 2: its facts, as small typed pieces, without I/O.

``docs/format.md`` is the specification; this module is where its facts live, each once: the
store's key names, the names a kind may take, the metadata document (:class:`Metadata`), the
commit record (:class:`CommitRecord`) and the tier rule it implies (:class:`RowTiers`), the two
profiles (:class:`Profile`), the per-array encodings (:class:`ArrayLayout`), and the checks on
each. Beside it, also pure: :mod:`wordystore.codecs` (the codecs and the shard index),
:mod:`wordystore.prediction` (Adam's replay) and :mod:`wordystore.kinds` (the dtypes). Reading and
writing the documents is :mod:`wordystore.documents`; the resume-state record is
:mod:`wordystore.resume_state`.

A trajectory keeps each kind in two tiers of zarr v3 arrays with the same row axis:

- the **hot** tier (``hot/<kind>``): rows as the writer wrote them, ``block_rows`` at a time,
  with a fast codec, so the writer holds only one block in memory;
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
from typing import Iterator, Mapping

import numpy as np

from wordystore.codecs import Blosc, Bytes, ChunkCodecs, Crc32c, PCodec, Transpose, encode_shard
from wordystore.errors import FormatError
from wordystore.kinds import Kind, numpy_dtype
from wordystore.prediction import AdamPrediction

FORMAT_NAME = "wordystore.trajectory"
FORMAT_VERSION = 2
ATTRS_KEY = "wordystore"  # root group attribute holding the metadata document

# -- keys (docs/format.md, "Keys") -------------------------------------------------------------------

ZARR_JSON = "zarr.json"  # a group's or an array's document; the root's holds the metadata
COMMIT_KEY = "commit.json"  # the commit record, a JSON document at the store's root
VERIFIED_KEY = "verified.json"  # the outcome of the last `wordystore verify`
STEPS_ARRAY = "recorded_steps"  # int64 [row]: the training step each row holds
TOKEN_SETS_GROUP = "token_sets"
HOT_GROUP = "hot"
STATE_PREFIX = "state"  # resume states: state/<row>.safetensors (wordystore.resume_state)
ANALYSIS_PREFIX = "analysis"  # cached analysis results: analysis/<name>-<digest>.json
CHUNK_DIR = "c"  # chunk key encoding "default" with "/": <array>/c/<i>/<j>/...
RESERVED_NAMES = frozenset({STEPS_ARRAY, TOKEN_SETS_GROUP, COMMIT_KEY, ZARR_JSON, ANALYSIS_PREFIX, HOT_GROUP,
                            STATE_PREFIX, VERIFIED_KEY})  # the store root's keys: no kind may take them
NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")  # a kind's or token set's name
GROUP_JSON = {"zarr_format": 3, "node_type": "group", "attributes": {}}  # a plain group's zarr.json
TIERS = ("main", "hot")
STEPS_KIND = Kind((), "int64", ())


def document_key(path: str) -> str:
    """The key of the ``zarr.json`` of the group or array at ``path`` (``""``: the root)."""
    return f"{path}/{ZARR_JSON}" if path else ZARR_JSON


def array_path(name: str, tier: str = "main") -> str:
    """Where array ``name`` (a kind or ``recorded_steps``) of ``tier`` lives: ``name`` or ``hot/name``."""
    return name if tier == "main" else f"{HOT_GROUP}/{name}"


def token_set_path(name: str) -> str:
    return f"{TOKEN_SETS_GROUP}/{name}"


def is_chunk_key(key: str) -> bool:
    """Whether ``key`` holds chunk bytes (a shard) rather than a document."""
    return f"/{CHUNK_DIR}/" in key


def check_kind_name(name: str) -> str:
    """A kind's or token set's name: letters, digits, ``_.-``, and none of the root's keys."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or name in RESERVED_NAMES:
        raise ValueError(
            f"kind name {name!r} is not allowed: use letters, digits, '_', '.', '-' "
            f"(starting with a letter or '_'), and none of {sorted(RESERVED_NAMES)}"
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
PROFILES = ("compact", "portable")
BITSHUFFLE_KINDS = frozenset({"grads", "momentum"})  # measured: bit shuffle wins on these
PCODEC_DTYPES = frozenset({"uint16", "int16", "float16", "int32", "float32", "int64", "float64"})  # what pcodec takes


def zarr_dtype(kind: Kind, profile: str) -> str:
    """The ``data_type`` a kind is stored as: bfloat16 bits go to pcodec as ``uint16``."""
    if kind.dtype == "bfloat16" and profile == "compact":
        return "uint16"
    return kind.dtype


@dataclass(frozen=True)
class ArrayLayout:
    """One zarr v3 array of the store: its key, stored dtype, shape, shards, inner chunks, codecs.

    ``to_zarr_json`` writes the array's ``zarr.json``; ``from_zarr_json`` reads one back (and
    refuses codecs wordystore does not implement), so the arrays stay readable by any zarr v3
    reader, and wordystore's own reader needs nothing but these documents.
    """

    path: str
    dtype: str
    shape: tuple[int, ...]
    shard: tuple[int, ...]
    chunk: tuple[int, ...]
    codecs: ChunkCodecs
    dims: tuple[str, ...]
    attributes: dict = field(default_factory=dict, compare=False)

    @property
    def numpy_dtype(self) -> np.dtype:
        return numpy_dtype(self.dtype)

    @property
    def prediction(self) -> AdamPrediction | None:
        """Set when the array stores residuals of a predicted moment (see :class:`AdamPrediction`)."""
        doc = self.attributes.get(ATTRS_KEY, {}).get("residual_of")
        return None if doc is None else AdamPrediction.from_json(doc)

    @property
    def chunks_per_shard(self) -> tuple[int, ...]:
        return tuple(s // c for s, c in zip(self.shard, self.chunk))

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
        return tuple(int(p) for p in parts) if parts and all(p.isdecimal() for p in parts) else None

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

    def encode_shard(self, data: np.ndarray) -> np.ndarray:
        """One shard's bytes (a uint8 array) from its region's data (edge shards are zero-padded to
        full chunks)."""
        data = data.view(self.numpy_dtype) if data.dtype != self.numpy_dtype else data
        if data.shape != self.shard:
            padded = np.zeros(self.shard, self.numpy_dtype)
            padded[tuple(slice(0, n) for n in data.shape)] = data
            data = padded
        grid = [range(0, s, c) for s, c in zip(self.shard, self.chunk)]
        return encode_shard([
            self.codecs.encode(data[tuple(slice(a, a + c) for a, c in zip(corner, self.chunk))])
            for corner in itertools.product(*grid)
        ])

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
    def from_zarr_json(cls, path: str, doc: dict) -> "ArrayLayout":
        try:
            (sharding,) = doc["codecs"]
            config = sharding["configuration"]
            if sharding["name"] != "sharding_indexed" or config.get("index_location", "end") != "end":
                raise FormatError(f"array '{path}' is not sharded with the index at the end")
            return cls(
                path=path,
                dtype=doc["data_type"],
                shape=tuple(doc["shape"]),
                shard=tuple(doc["chunk_grid"]["configuration"]["chunk_shape"]),
                chunk=tuple(config["chunk_shape"]),
                codecs=ChunkCodecs.from_list(config["codecs"]),
                dims=tuple(doc.get("dimension_names") or ()),
                attributes=doc.get("attributes", {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"array '{path}': zarr.json is not a wordystore array ({exc!r})") from None


@dataclass(frozen=True)
class Profile:
    """How arrays are cut and compressed.

    - ``compact`` (default): main chunks of ``CHUNK_ROWS`` rows, step axis fastest, pcodec (which
      delta-codes along it): 4-5x smaller than the raw tensors. Readable by zarr-python (its
      ``numcodecs.pcodec``) and zarrs; bfloat16 is stored as its uint16 bits.
    - ``portable``: the same cuts with codecs every zarr v3 reader has (transpose, blosc zstd,
      crc32c) and the ``bfloat16`` data type: tensorstore reads it as is.
    """

    name: str

    def __post_init__(self):
        if self.name not in PROFILES:
            raise ValueError(f"profile {self.name!r} is not one of {PROFILES}")

    def main_layout(self, name: str, kind: Kind, rows: int, chunk_rows: int = CHUNK_ROWS,
                    prediction: AdamPrediction | None = None) -> ArrayLayout:
        """``prediction`` (compact profile only): store the moment as residuals against it."""
        dtype = zarr_dtype(kind, self.name)
        attributes = _view_attributes(kind, dtype)
        if prediction is not None and self.name == "compact":
            dtype = "int16"
            attributes = {ATTRS_KEY: {"view_as": kind.dtype, "residual_of": prediction.to_json()}}
        chunk, shard = _cut(kind, chunk_rows)
        transpose = Transpose((*range(1, len(chunk)), 0)) if len(chunk) > 1 else None
        if self.name == "compact" and dtype in PCODEC_DTYPES:
            codecs = ChunkCodecs(transpose, PCodec(PCODEC_LEVEL), (Crc32c(),))
        else:
            shuffle = "bitshuffle" if name in BITSHUFFLE_KINDS else "shuffle"
            codecs = ChunkCodecs(transpose, Bytes(), (Blosc("zstd", 1, shuffle, kind.numpy_dtype.itemsize), Crc32c()))
        return ArrayLayout(array_path(name), dtype, (rows, *kind.shape), shard, chunk, codecs, ("step", *kind.dims),
                           attributes)

    def hot_layout(self, name: str, kind: Kind, rows: int, block_rows: int = BLOCK_ROWS) -> ArrayLayout:
        """Hot rows: ``block_rows`` per chunk, the main tier's shards with one chunk each, raw bytes
        and a checksum: the cheapest to write and to read back once for compaction (measured
        against blosc lz4: docs/format.md, "Why these choices")."""
        dtype = zarr_dtype(kind, self.name)
        _, shard = _cut(kind, block_rows)
        codecs = ChunkCodecs(None, Bytes(), (Crc32c(),))
        return ArrayLayout(array_path(name, "hot"), dtype, (rows, *kind.shape), shard, shard, codecs,
                           ("step", *kind.dims), _view_attributes(kind, dtype))


def _view_attributes(kind: Kind, dtype: str) -> dict:
    """Arrays whose stored dtype is not the kind's say so, for other readers."""
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


def token_set_layout(name: str, size: int) -> ArrayLayout:
    """``token_sets/<name>``: int64 ids in chunks of 65,536 with blosc and crc32c, like any data."""
    chunk = max(1, min(size, 65536))
    codecs = ChunkCodecs(None, Bytes(), (Blosc("zstd", 1, "shuffle", 8), Crc32c()))
    return ArrayLayout(token_set_path(name), "int64", (size,), (chunk,), (chunk,), codecs, ("token",))


def is_token_set_layout(layout: ArrayLayout, name: str) -> bool:
    """Exactly a token set's layout: an edited shape must not read as a shorter set."""
    return len(layout.shape) == 1 and isinstance(layout.shape[0], int) and layout == token_set_layout(name, layout.shape[0])


def check_predictions(predictions: dict[str, AdamPrediction], kinds: dict[str, Kind]) -> None:
    """A prediction rebuilds a bfloat16 kind from a gradient kind of the same shape and a 0-d norm."""
    for name, p in predictions.items():
        kind, grads, norm = kinds.get(name), kinds.get(p.grads), kinds.get(p.grad_norm)
        if kind is None or kind.dtype != "bfloat16" or grads is None or grads.shape != kind.shape \
                or grads.dtype != "bfloat16" or norm is None or norm.shape != () or name in (p.grads, p.grad_norm):
            raise ValueError(f"prediction of {name!r} needs bfloat16 kinds {name!r} and {p.grads!r} of one shape "
                             f"and a 0-d kind {p.grad_norm!r}; the kinds are {sorted(kinds)}")


def check_rows(block_rows: int, chunk_rows: int) -> None:
    """Hot blocks must tile main chunks: ``block_rows`` divides ``chunk_rows``."""
    if not all(isinstance(n, int) and n >= 1 for n in (block_rows, chunk_rows)) or chunk_rows % block_rows:
        raise ValueError(f"block_rows {block_rows!r} must be a positive int dividing chunk_rows {chunk_rows!r}")


# -- the documents --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metadata:
    """The root group's ``attributes.wordystore``: what the trajectory records and how."""

    kinds: dict[str, Kind]
    profile: str
    token_sets: tuple[str, ...]
    config: dict
    created: str
    versions: dict
    block_rows: int = BLOCK_ROWS
    chunk_rows: int = CHUNK_ROWS
    predictions: dict[str, AdamPrediction] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
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
    def from_root_json(cls, root: dict, where: str) -> "Metadata":
        if root.get("node_type") != "group":
            raise FormatError(f"{where} is a zarr array, not a wordystore trajectory (a zarr group)")
        return cls.from_json(root.get("attributes", {}).get(ATTRS_KEY), where)

    @classmethod
    def from_json(cls, doc, where: str) -> "Metadata":
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise FormatError(f"{where} is a zarr group but not a wordystore trajectory (no '{ATTRS_KEY}' attributes)")
        version = doc.get("format_version")
        if version == 1:
            raise FormatError(f"{where} is a format-1 trajectory; convert it with: wordystore convert {where} NEW.zarr")
        if version != FORMAT_VERSION:
            raise FormatError(f"{where} has format version {version!r}; this wordystore reads version {FORMAT_VERSION}")
        try:
            meta = cls(
                kinds={name: Kind.from_json(spec) for name, spec in doc["kinds"].items()},
                profile=Profile(doc["profile"]).name,
                token_sets=tuple(doc["token_sets"]),
                config=doc["config"],
                created=doc["created"],
                versions=doc.get("versions", {}),
                block_rows=int(doc["block_rows"]),
                chunk_rows=int(doc["chunk_rows"]),
                predictions={name: AdamPrediction.from_json(p) for name, p in doc.get("predictions", {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FormatError(f"{where}: the metadata document is damaged ({exc!r})") from None
        try:
            check_rows(meta.block_rows, meta.chunk_rows)
        except ValueError as exc:
            raise FormatError(f"{where}: the metadata document is damaged ({exc})") from None
        return meta

    def arrays(self) -> dict[str, Kind]:
        """Every per-row array: the kinds and ``recorded_steps``."""
        return {**self.kinds, STEPS_ARRAY: STEPS_KIND}

    def layouts(self, name: str, rows: int = 0) -> tuple[ArrayLayout, ArrayLayout]:
        """The (main, hot) layouts this metadata determines for array ``name`` with ``rows`` rows."""
        kind, profile = self.arrays()[name], Profile(self.profile)
        return (profile.main_layout(name, kind, rows, self.chunk_rows, self.predictions.get(name)),
                profile.hot_layout(name, kind, rows, self.block_rows))


def layout_mismatch(actual: ArrayLayout, expected: ArrayLayout) -> str | None:
    """How an array's zarr.json disagrees with the layout the metadata determines, in what reading
    it depends on (None if it agrees; inner chunks along other axes may differ: readers follow them)."""
    def counts(values) -> bool:
        return all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in values)

    if len(actual.shape) != len(expected.shape) or not (len(actual.chunk) == len(actual.shard) == len(actual.shape)) \
            or not counts((*actual.shape, *actual.chunk, *actual.shard)) \
            or not all(c > 0 and s % c == 0 for c, s in zip(actual.chunk, actual.shard)):
        return (f"has shape {list(actual.shape)}, shards {list(actual.shard)} and chunks {list(actual.chunk)}; "
                f"expected {len(expected.shape)} axes and chunks dividing shards")
    try:
        prediction = actual.prediction
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return f"has a damaged prediction attribute ({exc!r})"
    checks = {
        "data type": (actual.dtype, expected.dtype),
        "shape per row": (actual.shape[1:], expected.shape[1:]),
        "dimension names": (actual.dims, expected.dims),
        "rows per chunk and shard": ((actual.chunk[0], actual.shard[0]), (expected.chunk[0], expected.shard[0])),
        "transpose": (actual.codecs.transpose, expected.codecs.transpose),
        "serializer": (type(actual.codecs.serializer).__name__, type(expected.codecs.serializer).__name__),
        "Adam prediction": (prediction, expected.prediction),
    }
    for what, (got, want) in checks.items():
        if got != want:
            return f"has {what} {got}; the metadata says {want}"
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


@dataclass(frozen=True)
class CommitRecord:
    """``commit.json``: rows ``[0, committed_rows)`` are valid; ``[0, compacted_rows)`` of them
    are in the main tier, the rest in the hot tier. ``states`` lists the resume states kept
    (``{"row", "step", "key"}``, oldest first; see :mod:`wordystore.resume_state`). ``writer``
    says how the writer that made the record was sized (informational: readers ignore it; see
    :class:`wordystore.pools.WriterPools`)."""

    committed_rows: int = 0
    compacted_rows: int = 0
    last_step: int | None = None
    states: tuple[dict, ...] = ()
    writer: dict | None = field(default=None, compare=False)

    @property
    def tiers(self) -> RowTiers:
        return RowTiers(self.compacted_rows, self.committed_rows)

    def to_json(self) -> dict:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "committed_rows": self.committed_rows,
                "compacted_rows": self.compacted_rows, "last_step": self.last_step, "states": list(self.states),
                **({"writer": self.writer} if self.writer is not None else {})}

    @classmethod
    def from_json(cls, doc, where: str) -> "CommitRecord":
        def is_count(v):
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise FormatError(f"{where}/{COMMIT_KEY} is not a wordystore commit record")
        committed, compacted = doc.get("committed_rows"), doc.get("compacted_rows")
        last, states = doc.get("last_step"), doc.get("states", [])
        if not (is_count(committed) and is_count(compacted) and compacted <= committed):
            raise FormatError(f"{where}/{COMMIT_KEY} is damaged: committed_rows {committed!r} and compacted_rows "
                              f"{compacted!r} must be counts with compacted <= committed")
        if (last is None) != (committed == 0) or (last is not None and not is_count(last)):
            raise FormatError(f"{where}/{COMMIT_KEY} is damaged: last_step {last!r} with {committed} rows")
        if not isinstance(states, list) or not all(isinstance(s, dict) and {"row", "step", "key"} <= set(s) for s in states):
            raise FormatError(f"{where}/{COMMIT_KEY} is damaged: states {states!r}")
        writer = doc.get("writer")
        return cls(committed, compacted, last, tuple(states), writer if isinstance(writer, dict) else None)


def check_arrays(where: str, meta: Metadata, record: CommitRecord,
                 layouts: dict[str, tuple[ArrayLayout, ArrayLayout]]) -> None:
    """The arrays (name -> (main, hot) layouts) of the store ``where`` agree with the metadata and
    hold every row the record admits in their tier; else a FormatError naming the first that does not."""
    for name, pair in layouts.items():
        for actual, expected in zip(pair, meta.layouts(name)):
            mismatch = layout_mismatch(actual, expected)
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
