"""The metadata document (:class:`Metadata`, the root group's ``attributes.wordystore``) and the checks
of an array's document and shards against what it declares (docs/format.md, "The metadata")."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from wordystore.errors import FormatError
from wordystore.format.codecs import (
    ShardBinding,
)
from wordystore.format.keys import (
    ATTRS_KEY,
    COMMIT_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    GROUP_JSON,
    READ_VERSIONS,
    STEPS_ARRAY,
    STEPS_KIND,
    check_kind_name,
    versions_text,
)
from wordystore.format.kinds import Kind
from wordystore.format.layout import (
    BLOCK_ROWS,
    CHUNK_ROWS,
    ArrayLayout,
    Profile,
    check_kinds,
    check_predictions,
    check_rows,
    token_set_layout,
)
from wordystore.format.prediction import Prediction, prediction_from_json

if TYPE_CHECKING:
    from wordystore.format.records import CommitRecord

# -- the documents --------------------------------------------------------------------------------------

STORE_ID = re.compile(r"^[0-9a-f]{32}$")  # format 3: a store's random id, which its shards are bound to


@dataclass(frozen=True)
class Metadata:
    """The root group's ``attributes.wordystore``: what the trajectory records and how. From
    format 3, ``store_id`` (32 random hex digits, chosen at creation) is what every shard of the
    store is bound to (:class:`wordystore.format.codecs.ShardBinding`)."""

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
        """What this store's shards are bound to: its id (format 3), and the digest of what decodes
        each (format 4); None in format 2, whose shards are not bound."""
        return ShardBinding(self.store_id, self.format_version >= 4) if self.format_version >= 3 else None

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
    def from_root_json(cls, root, where: str) -> Metadata:
        if not isinstance(root, dict) or root.get("node_type") != "group":
            raise FormatError(f"{where} is not a wordystore trajectory: its zarr.json is not a zarr group's")
        attributes = root.get("attributes")
        return cls.from_json(attributes.get(ATTRS_KEY) if isinstance(attributes, dict) else None, where)

    @classmethod
    def from_json(cls, doc, where: str) -> Metadata:
        """The metadata document, every field checked (names, counts, limits) before anything
        relies on it; a FormatError naming the first field that is wrong."""
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise FormatError(f"{where} is a zarr group but not a wordystore trajectory (no '{ATTRS_KEY}' attributes)")
        version = doc.get("format_version")
        if version == 1:
            raise FormatError(f"{where} is a format-1 trajectory; convert it with: wordystore convert {where} NEW.zarr")
        if version not in READ_VERSIONS or isinstance(version, bool):
            raise FormatError(
                f"{where} has format version {version!r}; this wordystore reads versions {versions_text()}"
            )
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
            config, created, versions = (
                _mapping(doc.get("config")),
                doc.get("created"),
                _mapping(doc.get("versions", {})),
            )
            if not isinstance(created, str):
                raise ValueError(f"created is {created!r}, not a time")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FormatError(f"{where}: the metadata document is damaged: {field_name}: {exc}") from None
        return cls(
            kinds,
            profile,
            token_sets,
            config,
            created,
            versions,
            doc["block_rows"],
            doc["chunk_rows"],
            predictions,
            store_id,
            version,
        )

    def arrays(self) -> dict[str, Kind]:
        """Every per-row array: the kinds and ``recorded_steps``."""
        return {**self.kinds, STEPS_ARRAY: STEPS_KIND}

    def layouts(self, name: str, rows: int = 0) -> tuple[ArrayLayout, ArrayLayout]:
        """The (main, hot) layouts this metadata determines for array ``name`` with ``rows`` rows
        (the hot one as a new array of it is written: :meth:`hot_layouts`)."""
        kind, profile, version, binding = self.arrays()[name], Profile(self.profile), self.format_version, self.binding
        return (
            profile.main_layout(name, kind, rows, self.chunk_rows, self.predictions.get(name), version, binding),
            self.hot_layouts(name, rows)[0],
        )

    def hot_layouts(self, name: str, rows: int = 0) -> tuple[ArrayLayout, ...]:
        """Every hot layout a store of this metadata may hold for array ``name``, the one a new array
        is written in first: format 3 writes the raw hot tier, and its stores written before it
        have blosc lz4 hot arrays, read and appended to as they are; format 2's are lz4."""
        kind, profile, version = self.arrays()[name], Profile(self.profile), self.format_version
        return tuple(
            profile.hot_layout(name, kind, rows, self.block_rows, version, self.binding, raw)
            for raw in ((True, False) if version >= 3 else (False,))
        )

    def token_set_layout(self, name: str, size: int) -> ArrayLayout:
        return token_set_layout(name, size, self.binding)


def _mapping(value) -> dict:
    if not isinstance(value, dict):
        raise TypeError(f"{type(value).__name__} where a JSON object belongs")
    return value


def check_writable(meta: Metadata, where: str) -> None:
    """Only stores of this format version are appended to: older ones are read, verified and converted."""
    if meta.format_version != FORMAT_VERSION:
        raise FormatError(
            f"{where} is a format-{meta.format_version} trajectory, which this wordystore reads but "
            f"does not append to; `wordystore convert {where} NEW.zarr` writes it as format "
            f"{FORMAT_VERSION} (rows, token sets, config and its newest resume state, bit for bit)"
        )


def layout_mismatch(actual: ArrayLayout, expected: ArrayLayout) -> str | None:
    """How an array's zarr.json disagrees with the layout the metadata determines (None if it agrees:
    the same data type, shape per row, shards, inner chunks, codecs, dimension names and prediction)."""
    if len(actual.shape) != len(expected.shape) or not (len(actual.chunk) == len(actual.shard) == len(actual.shape)):
        return (
            f"has shape {list(actual.shape)}, shards {list(actual.shard)} and chunks {list(actual.chunk)}; "
            f"expected {len(expected.shape)} axes"
        )
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


def fields_problem(what: str, got, want: dict, values: bool = True) -> str | None:
    """Which fields of the JSON object ``got`` (a document's ``what``) are missing or extra against
    ``want``, the fields the metadata determines, and (with ``values``) which hold other values than
    there (but a prediction: :func:`layout_mismatch` compares it as it reads); None if none."""
    if not isinstance(got, dict):
        return f"{what} is {got!r}, not an object"
    missing = [k for k in want if k not in got]
    extra = sorted(k for k in got if k not in want)
    other = [k for k in want if values and k in got and k not in PREDICTION_KEYS and got[k] != want[k]]
    parts = [f"{label} {names}" for label, names in (("lacks", missing), ("adds", extra), ("changes", other)) if names]
    return f"{what} {' and '.join(parts)} (against what the metadata determines)" if parts else None


PREDICTION_KEYS = ("prediction", "residual_of")  # a residual array's prediction (format 3 and later, format 2)


def attributes_problem(actual: ArrayLayout, expected: ArrayLayout) -> str | None:
    """Which of the ``attributes.wordystore`` the metadata determines for an array (``expected``'s)
    its zarr.json lacks, adds or changes; None if none. They decode nothing (a residual array's
    ``residuals_of`` names its kind), but another zarr reader finds what an array holds there."""
    return fields_problem(
        f"attributes.{ATTRS_KEY}", actual.attributes.get(ATTRS_KEY, {}), expected.attributes.get(ATTRS_KEY, {})
    )


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


def rows_problem(name: str, pair: tuple[ArrayLayout, ArrayLayout], record: CommitRecord, keys: list[str]) -> str | None:
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
    return (
        f"{COMMIT_KEY} admits {record.committed_rows} rows but the shards of array '{name}' hold at most {held} "
        f"('{first}' is missing)"
    )


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
            return (
                f"array '{name}' is {layout.shape[axis]} long along '{layout.dims[axis]}' (the metadata's "
                f"kinds[{name!r}].shape is {list(layout.shape[1:])}): {needed} shards, but its shards present "
                f"cover {have}"
            )
    return None
