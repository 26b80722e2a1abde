"""The commit record (:class:`CommitRecord`) and the tier rule it implies (:class:`RowTiers`), the
writer lease on object storage (:class:`LeaseRecord`), and the check of every array against both
documents (:func:`check_arrays`) (docs/format.md, "The commit record")."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from wordystore.errors import FormatError
from wordystore.format.keys import (
    COMMIT_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_ROWS,
    MAX_STATE_BYTES,
    READ_VERSIONS,
    TIERS,
    WRITER_LOCK_KEY,
    state_key,
    versions_text,
)
from wordystore.format.layout import ArrayLayout, _is_count
from wordystore.format.metadata import Metadata, array_mismatch


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
    if version >= 3 and not (
        _is_count(entry["crc32c"])
        and entry["crc32c"] < 2**32
        and _is_count(entry["nbytes"])
        and entry["nbytes"] <= MAX_STATE_BYTES
    ):
        return (
            f"has crc32c {entry['crc32c']!r} and nbytes {entry['nbytes']!r}; expected a CRC-32C and a size of at "
            f"most {MAX_STATE_BYTES} bytes"
        )
    return None


@dataclass(frozen=True)
class CommitRecord:
    """``commit.json``: rows ``[0, committed_rows)`` are valid; ``[0, compacted_rows)`` of them
    are in the main tier, the rest in the hot tier. ``states`` lists the resume states kept
    (``{"row", "step", "key", "crc32c", "nbytes"}``, oldest first; see :mod:`wordystore.store.resume_state`).
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
        doc = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "committed_rows": self.committed_rows,
            "compacted_rows": self.compacted_rows,
            "last_step": self.last_step,
            "states": list(self.states),
        }
        if self.writer_generation:
            doc["writer_generation"] = self.writer_generation
        if self.writer is not None:
            doc["writer"] = self.writer
        return doc

    @classmethod
    def from_json(cls, doc, where: str) -> CommitRecord:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise FormatError(f"{where}/{COMMIT_KEY} is not a wordystore commit record")
        version = doc.get("format_version")
        if version not in READ_VERSIONS or isinstance(version, bool):
            raise FormatError(
                f"{where}/{COMMIT_KEY} has format version {version!r}; this wordystore reads versions {versions_text()}"
            )
        committed, compacted = doc.get("committed_rows"), doc.get("compacted_rows")
        last, states = doc.get("last_step"), doc.get("states", [])
        if not (_is_count(committed) and _is_count(compacted) and compacted <= committed <= MAX_ROWS):
            raise FormatError(
                f"{where}/{COMMIT_KEY} is damaged: committed_rows {committed!r} and compacted_rows "
                f"{compacted!r} must be counts with compacted <= committed <= {MAX_ROWS}"
            )
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
            raise FormatError(
                f"{where}/{COMMIT_KEY} is damaged: writer_generation {generation!r} is not a count of "
                f"at most {MAX_LEASE_GENERATION}"
            )
        writer = doc.get("writer")
        return cls(
            committed, compacted, last, tuple(states), version, generation, writer if isinstance(writer, dict) else None
        )


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
        return {
            "owner": self.owner,
            "generation": self.generation,
            "expires_at": self.expires_at,
            "duration_s": self.duration_s,
        }

    @classmethod
    def from_json(cls, doc, where: str) -> LeaseRecord:
        owner, generation = (doc.get(k) if isinstance(doc, dict) else None for k in ("owner", "generation"))
        expires_at, duration = (doc.get(k) if isinstance(doc, dict) else None for k in ("expires_at", "duration_s"))
        numbers = all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
            for x in (expires_at, duration)
        )
        if not (
            isinstance(owner, str)
            and 0 < len(owner) <= MAX_OWNER_LENGTH
            and _is_count(generation)
            and 0 < generation <= MAX_LEASE_GENERATION
            and numbers
        ):
            raise FormatError(
                f"{where}/{WRITER_LOCK_KEY} is not a writer lease: expected owner (at most "
                f"{MAX_OWNER_LENGTH} characters), generation (1 to {MAX_LEASE_GENERATION}), expires_at "
                "and duration_s (seconds); delete it once no writer runs"
            )
        return cls(owner, generation, float(expires_at), float(duration))


def check_arrays(
    where: str, meta: Metadata, record: CommitRecord, layouts: dict[str, tuple[ArrayLayout, ArrayLayout]]
) -> None:
    """The arrays (name -> (main, hot) layouts) of the store ``where`` agree with the metadata and
    hold every row the record admits in their tier; else a FormatError naming the first that does not."""
    if record.format_version != meta.format_version:
        raise FormatError(
            f"{where}: {COMMIT_KEY} is of format {record.format_version} but the metadata of format "
            f"{meta.format_version}; run `wordystore verify {where}`"
        )
    for name, pair in layouts.items():
        for tier, actual in zip(TIERS, pair):
            mismatch = array_mismatch(meta, tier, name, actual)
            if mismatch:
                raise FormatError(
                    f"{where}: array '{actual.path}': its zarr.json {mismatch}; run `wordystore verify {where}`"
                )
        main, hot = pair
        if any(
            start < stop and layout.shape[0] < stop
            for layout, (start, stop) in zip(pair, map(record.tiers.span, TIERS))
        ):
            raise FormatError(
                f"{where}: {COMMIT_KEY} admits {record.committed_rows} rows ({record.compacted_rows} compacted) but "
                f"array '{name}' holds {main.shape[0]} compacted and {hot.shape[0]} hot rows; "
                f"run `wordystore verify {where} --repair`"
            )
