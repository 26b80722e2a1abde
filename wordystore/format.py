"""The wordystore trajectory format, version 2: its one implementation.

``docs/format.md`` is the specification; every fact of it lives here once, as a small typed piece
with ``to_json``/``from_json``: the metadata document (:class:`Metadata`), the commit record
(:class:`CommitRecord`), the two profiles (:class:`Profile`) and the per-array encodings
(:class:`ArrayLayout`). The writer, the reader, ``convert`` and ``verify`` all go through it.

A trajectory keeps each kind in two tiers of zarr v3 arrays with the same row axis:

- the **hot** tier (``hot/<kind>``): rows as the writer wrote them, ``block_rows`` at a time,
  with a fast codec, so the writer holds only one block in memory;
- the **main** tier (``<kind>``): rows compacted into long chunks of ``chunk_rows`` rows with the
  profile's codec, which is what makes the store small.

The commit record says how many rows are committed and how many of those are compacted: rows
below ``compacted_rows`` are read from the main tier, the rest from the hot tier.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field, replace

import numpy as np

from wordystore.codecs import Blosc, Bytes, ChunkCodecs, Crc32c, PCodec, Transpose, encode_shard  # noqa: F401 (re-exported)
from wordystore.errors import FormatError
from wordystore.bfloat16 import NUMPY_BFLOAT16 as BFLOAT16
from wordystore.kinds import Kind

FORMAT_NAME = "wordystore.trajectory"
FORMAT_VERSION = 2
ATTRS_KEY = "wordystore"  # root group attribute holding the metadata document
COMMIT_KEY = "commit.json"  # the commit record, a JSON document at the store's root
STEPS_ARRAY = "recorded_steps"  # int64 [row]: the training step each row holds
TOKEN_SETS_GROUP = "token_sets"
HOT_GROUP = "hot"
STATE_PREFIX = "state"  # resume states: state/<row>.safetensors
STEPS_KIND = Kind((), "int64", ())

BLOCK_ROWS = 8  # rows per hot chunk: what the writer buffers before writing
CHUNK_ROWS = 32  # rows per main chunk: long runs of steps compress well (docs/format.md)
CHUNK_BYTES = 1 << 20  # target raw bytes of one main inner chunk (256 tokens x 64 dims x 32 rows)
CHUNKS_PER_SHARD = 16  # inner chunks per shard along the first per-step axis (tokens)
PCODEC_LEVEL = 8
PROFILES = ("compact", "portable")
BITSHUFFLE_KINDS = frozenset({"grads", "momentum"})  # measured: bit shuffle wins on these


def zarr_dtype(kind: Kind, profile: str) -> str:
    """The ``data_type`` a kind is stored as: bfloat16 bits go to pcodec as ``uint16``."""
    if kind.dtype == "bfloat16" and profile == "compact":
        return "uint16"
    return kind.dtype


PCODEC_DTYPES = frozenset({"uint16", "int16", "float16", "int32", "float32", "int64", "float64"})  # what pcodec takes


@dataclass(frozen=True)
class AdamPrediction:
    """Adam's moment rows stored as residuals against a prediction (compact profile, main tier).

    Row ``r`` of a moment is predicted from the row before it and the recorded *pre-clip*
    gradient row, replaying one bfloat16 AdamW update in float32 (the first row of each main
    chunk is predicted from zeros, so every chunk decodes on its own)::

        c   = bf16(min(1, max_norm / (bf16(grad_norm[r]) + 1e-6)))      # 1 without max_norm
        g   = bf16(grads[r] * c)                                          # the clipped gradient
        exp_avg:    pred = bf16(prev + f32(1 - beta) * (g - prev))
        exp_avg_sq: pred = bf16(bf16(prev * f32(beta)) + f32(1 - beta) * g * g)

    all in float32 arithmetic, one rounding per operation (IEEE, round to nearest even), a NaN
    prediction taken as the bits 0x7FC0. The
    stored value is ``(bits(row) - bits(pred)) mod 2**16`` as int16; a reader adds it back. It is
    lossless whatever the prediction's quality; on the seed run 97-99% of the residuals are 0.
    """

    moment: str  # "exp_avg" or "exp_avg_sq"
    grads: str  # the kind holding the pre-clip gradient rows (same shape)
    grad_norm: str  # the 0-d float32 kind holding the gradient's global L2 norm
    beta: float
    max_norm: float | None = None

    def __post_init__(self):
        if self.moment not in ("exp_avg", "exp_avg_sq"):
            raise ValueError(f"AdamPrediction moment must be 'exp_avg' or 'exp_avg_sq', got {self.moment!r}")

    def to_json(self) -> dict:
        return {"moment": self.moment, "grads": self.grads, "grad_norm": self.grad_norm, "beta": self.beta,
                "max_norm": self.max_norm}

    @classmethod
    def from_json(cls, doc: dict) -> "AdamPrediction":
        return cls(doc["moment"], doc["grads"], doc["grad_norm"], float(doc["beta"]),
                   None if doc.get("max_norm") is None else float(doc["max_norm"]))

    def _predict(self, prev: np.ndarray, grad: np.ndarray, norm: np.float32) -> np.ndarray:
        """float32 ``prev`` and a bfloat16 ``grad`` (or its uint16 bits, as the compact profile
        stores it) -> the predicted row's bfloat16 bits (uint16)."""
        f32 = np.float32
        grad = grad.view(BFLOAT16) if grad.dtype == np.uint16 else grad
        c = f32(1)
        if self.max_norm is not None:
            c = _bf16(np.minimum(f32(1), f32(self.max_norm) / (_bf16(norm) + f32(1e-6))))
        g = _bf16(grad.astype(f32) * c)
        if self.moment == "exp_avg":
            pred = prev + f32(1 - self.beta) * (g - prev)
        else:
            pred = _bf16(prev * f32(self.beta)) + f32(1 - self.beta) * g * g
        bits = pred.astype(BFLOAT16).view(np.uint16)
        bits[np.isnan(pred)] = CANONICAL_NAN  # NaN payloads from arithmetic differ between machines
        return bits

    def residuals(self, moment: np.ndarray, grads: np.ndarray, norms: np.ndarray, axis: int = 0) -> np.ndarray:
        """int16 residuals of the moment rows along ``axis`` (the chunk's rows, from its first)."""
        return self._replay(moment.view(np.uint16), grads, norms, axis, encode=True).view(np.int16)

    def rebuild(self, residuals: np.ndarray, grads: np.ndarray, norms: np.ndarray, axis: int = 0) -> np.ndarray:
        """The moment rows' bfloat16 bits (uint16) from their residuals: :meth:`residuals` undone."""
        return self._replay(residuals.view(np.uint16), grads, norms, axis, encode=False)

    def _replay(self, data: np.ndarray, grads: np.ndarray, norms: np.ndarray, axis: int, encode: bool) -> np.ndarray:
        """Walk the rows in order, predicting each from the moment row before it: ``encode`` turns
        moment bits into residuals (``moment - pred``), else residuals into moment bits (``pred +
        residual``), both mod 2**16. The result is C-ordered like ``data``. The walk runs on
        row-major copies: in a chunk's stored order each row is strided, and 5x slower to compute on."""
        rows, grads = (np.ascontiguousarray(np.moveaxis(a, axis, 0)) for a in (data, grads))
        out = np.empty(rows.shape, np.uint16)
        prev = np.zeros(rows.shape[1:], np.float32)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            for r in range(rows.shape[0]):
                pred = self._predict(prev, grads[r], norms[r])
                if encode:
                    np.subtract(rows[r], pred, out=out[r])
                    moment = rows[r]
                else:
                    np.add(pred, rows[r], out=out[r])
                    moment = out[r]
                prev = moment.view(BFLOAT16).astype(np.float32)
        return np.ascontiguousarray(np.moveaxis(out, 0, axis))


CANONICAL_NAN = 0x7FC0  # the bfloat16 quiet NaN a NaN prediction is taken as


def _bf16(x) -> np.ndarray:
    """Round float32 to bfloat16 and back (nearest even): one bfloat16 operation's rounding."""
    return np.asarray(x, np.float32).astype(BFLOAT16).astype(np.float32)


def adam_predictions(beta1: float, beta2: float, max_norm: float | None, grads: str = "grads",
                     grad_norm: str = "grad_norm") -> dict[str, AdamPrediction]:
    """The predictions of the seed kinds ``momentum`` and ``variance`` for an AdamW run with these
    betas and gradient clipping (``max_norm``; None for none), recorded every step.

    >>> wordystore.create(path, kinds, predictions=wordystore.adam_predictions(0.9, 0.999, 1.0))
    """
    return {"momentum": AdamPrediction("exp_avg", grads, grad_norm, beta1, max_norm),
            "variance": AdamPrediction("exp_avg_sq", grads, grad_norm, beta2, max_norm)}


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
        return BFLOAT16 if self.dtype == "bfloat16" else np.dtype(self.dtype)

    @property
    def prediction(self) -> AdamPrediction | None:
        """Set when the array stores residuals of a predicted moment (see :class:`AdamPrediction`)."""
        doc = self.attributes.get(ATTRS_KEY, {}).get("residual_of")
        return None if doc is None else AdamPrediction.from_json(doc)

    @property
    def chunks_per_shard(self) -> tuple[int, ...]:
        return tuple(s // c for s, c in zip(self.shard, self.chunk))

    def shard_grid(self) -> tuple[int, ...]:
        return tuple(math.ceil(n / s) for n, s in zip(self.shape, self.shard))

    def shard_key(self, coords: tuple[int, ...]) -> str:
        return f"{self.path}/c/" + "/".join(str(c) for c in coords)

    def with_rows(self, rows: int) -> "ArrayLayout":
        return replace(self, shape=(rows, *self.shape[1:]))

    def shard_region(self, coords: tuple[int, ...]) -> tuple[slice, ...]:
        """The part of the array shard ``coords`` covers (clipped to the array's shape)."""
        return tuple(slice(c * s, min((c + 1) * s, n)) for c, s, n in zip(coords, self.shard, self.shape))

    def encode_shard(self, data: np.ndarray) -> bytes:
        """One shard's bytes from its region's data (edge shards are zero-padded to full chunks)."""
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
        return ArrayLayout(name, dtype, (rows, *kind.shape), shard, chunk, codecs, ("step", *kind.dims), attributes)

    def hot_layout(self, name: str, kind: Kind, rows: int, block_rows: int = BLOCK_ROWS) -> ArrayLayout:
        """Hot rows: ``block_rows`` per chunk, blosc lz4 (fast to write, read back once to compact)."""
        dtype = zarr_dtype(kind, self.name)
        chunk, shard = _cut(kind, block_rows)
        codecs = ChunkCodecs(None, Bytes(), (Blosc("lz4", 1, "shuffle", kind.numpy_dtype.itemsize), Crc32c()))
        return ArrayLayout(f"{HOT_GROUP}/{name}", dtype, (rows, *kind.shape), shard, chunk, codecs,
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
    return ArrayLayout(f"{TOKEN_SETS_GROUP}/{name}", "int64", (size,), (chunk,), (chunk,), codecs, ("token",))


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
class CommitRecord:
    """``commit.json``: rows ``[0, committed_rows)`` are valid; ``[0, compacted_rows)`` of them
    are in the main tier, the rest in the hot tier. ``states`` lists the resume states kept
    (``{"row", "step", "key"}``, oldest first)."""

    committed_rows: int = 0
    compacted_rows: int = 0
    last_step: int | None = None
    states: tuple[dict, ...] = ()

    def to_json(self) -> dict:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "committed_rows": self.committed_rows,
                "compacted_rows": self.compacted_rows, "last_step": self.last_step, "states": list(self.states)}

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
        return cls(committed, compacted, last, tuple(states))


def dumps(document: dict) -> bytes:
    return json.dumps(document, indent=1, allow_nan=False).encode()


def loads(data: bytes, key: str):
    """Parse a JSON document; a damaged one is a FormatError naming its key."""
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{key} is not valid JSON ({exc})") from None


# -- reading and writing the documents ------------------------------------------------------------

GROUP_JSON = {"zarr_format": 3, "node_type": "group", "attributes": {}}


def read_json(store, key: str):
    """A JSON document of the store; None when the key is absent."""
    from wordystore import storage

    data = storage.get(store, key)
    return None if data is None else loads(data, f"{storage.describe(store)}/{key}")


def write_json(store, key: str, document: dict, durable: bool = False) -> None:
    from wordystore import storage

    storage.put(store, key, dumps(document))
    if durable:
        storage.sync_to_disk(store, [key])


def read_metadata(store) -> Metadata:
    from wordystore import storage

    where = storage.describe(store)
    try:
        root = read_json(store, "zarr.json")
    except FileNotFoundError:  # a read-only local store whose directory does not exist
        root = None
    if root is None:
        raise FileNotFoundError(f"no trajectory at {where}: it has no zarr.json")
    if root.get("node_type") != "group":
        raise FormatError(f"{where} is a zarr array, not a wordystore trajectory (a zarr group)")
    return Metadata.from_json(root.get("attributes", {}).get(ATTRS_KEY), where)


def write_metadata(store, meta: Metadata, durable: bool = False) -> None:
    write_json(store, "zarr.json", {**GROUP_JSON, "attributes": {ATTRS_KEY: meta.to_json()}}, durable)


def read_commit(store) -> CommitRecord:
    from wordystore import storage

    where = storage.describe(store)
    try:
        doc = read_json(store, COMMIT_KEY)
        if doc is None:
            raise FormatError(f"{where} has no {COMMIT_KEY}: it was never completely created, or the record was lost")
        return CommitRecord.from_json(doc, where)
    except FormatError as exc:  # every damaged record: say how to rebuild it
        raise FormatError(f"{exc}; `wordystore verify {where} --repair` rebuilds it from the rows that verify") from None


def check_arrays(store, meta: Metadata, record: CommitRecord,
                 layouts: dict[str, tuple[ArrayLayout, ArrayLayout]]) -> None:
    """The arrays (name -> (main, hot) layouts) agree with the metadata and hold every row the
    record admits; else a FormatError naming the first that does not."""
    from wordystore import storage

    where = storage.describe(store)
    for name, (main, hot) in layouts.items():
        for actual, expected in zip((main, hot), meta.layouts(name)):
            mismatch = layout_mismatch(actual, expected)
            if mismatch:
                raise FormatError(f"{where}: array '{actual.path}': its zarr.json {mismatch}; "
                                  f"run `wordystore verify {where}`")
        if main.shape[0] < record.compacted_rows or (record.committed_rows > record.compacted_rows
                                                     and hot.shape[0] < record.committed_rows):
            raise FormatError(
                f"{where}: {COMMIT_KEY} admits {record.committed_rows} rows ({record.compacted_rows} compacted) but "
                f"array '{name}' holds {main.shape[0]} compacted and {hot.shape[0]} hot rows; "
                f"run `wordystore verify {where} --repair`")


def write_commit(store, record: CommitRecord, durable: bool = False) -> None:
    write_json(store, COMMIT_KEY, record.to_json(), durable)


def read_layout(store, path: str) -> ArrayLayout:
    from wordystore import storage

    doc = read_json(store, f"{path}/zarr.json")
    if doc is None:
        raise FormatError(f"{storage.describe(store)}: array '{path}' is missing (no {path}/zarr.json)")
    return ArrayLayout.from_zarr_json(path, doc)


def read_token_set_layout(store, name: str) -> ArrayLayout:
    """The layout of ``token_sets/<name>``, refused unless it is exactly a token set's: an edited
    shape must not read as a shorter set."""
    from wordystore import storage

    layout = read_layout(store, f"{TOKEN_SETS_GROUP}/{name}")
    if len(layout.shape) != 1 or not isinstance(layout.shape[0], int) or layout != token_set_layout(name, layout.shape[0]):
        raise FormatError(f"{storage.describe(store)}: array '{layout.path}': its zarr.json is not a token set's "
                          "(int64 ids on one axis, in chunks of min(size, 65536), blosc and crc32c)")
    return layout


def write_layout(store, layout: ArrayLayout, durable: bool = False) -> None:
    write_json(store, f"{layout.path}/zarr.json", layout.to_zarr_json(), durable)
