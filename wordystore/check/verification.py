"""``wordystore verify``: check every committed byte of a trajectory, and rebuild its commit record
from what verifies.

>>> report = wordystore.verify("runs/wb1b.zarr")
>>> report.ok, report.verified_rows
(True, 201)
>>> print(report.summary())                           # what `wordystore verify` prints
>>> wordystore.verify("runs/wb1b.zarr", repair=True)  # `wordystore verify --repair`

The pass itself, and what it checks in which order, is :mod:`wordystore.check.store_scan`; the repair is
:mod:`wordystore.check.repair`. Every run records its outcome in ``verified.json``
(``{"committed_rows", "time", "problems"}``), which ``wordystore info`` shows
(:func:`wordystore.read.display.integrity`, with its own cheap check for missing shards).
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass

import numpy as np

from wordystore.check.repair import Repair, repair_store
from wordystore.check.store_scan import Problem, StoreScan
from wordystore.errors import FormatError
from wordystore.format.keys import COMMIT_KEY, FORMAT_VERSION, HOT_GROUP, READ_VERSIONS, VERIFIED_KEY, document_key
from wordystore.format.records import CommitRecord
from wordystore.store import json_documents, storage
from wordystore.store.lease import writer_lock
from wordystore.store.storage import as_store

PREDATES = {  # what a store of an older format lacks, and so what verify cannot detect in it
    2: "chunks bound to their place and resume states with checksums, so a shard copied over another, a chunk "
    "swapped, an edit of the decoding parameters or a changed resume state is not detected",
    3: "the binding of decoding parameters to its shards, so an edit of an array's codecs, data type, shape or "
    "prediction that agrees with the metadata is not detected",
}


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of :func:`verify`: ``ok`` when nothing is wrong; ``summary()`` says it all."""

    store: str
    record: CommitRecord | None  # the commit record checked (None: missing or unreadable)
    verified_rows: int  # the longest prefix of rows that verifies in every array
    steps: np.ndarray  # the training steps of those rows
    chunks: int  # inner chunks checked
    problems: tuple[Problem, ...]
    repair: Repair | None = None
    note: str | None = None  # set when the outcome could not be recorded in verified.json
    known_steps: np.ndarray | None = None  # per row checked, its training step (-1 where recorded_steps is damaged)
    format_version: int | None = None  # of the metadata (None: unreadable)
    leftovers: tuple[str, ...] = ()  # temporary files a killed writer left (no damage: nothing reads them)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def exit_status(self) -> int:
        """0 when the store verifies and a repair lost nothing; else 1 (``wordystore verify``'s status)."""
        return 0 if self.ok and not (self.repair and self.repair.not_saved) else 1

    def summary(self) -> str:
        """What ``wordystore verify`` prints: the outcome, each problem, the repair."""
        rows = (
            f"{self.record.committed_rows} rows committed ({self.record.compacted_rows} compacted)"
            if self.record
            else "no readable commit record"
        )
        lines = [f"{self.store}: {rows}; {self.chunks} chunks checked"]
        if self.ok:
            lines.append(f"ok: every row verifies ({_rows_text(0, self.verified_rows, self.steps)})")
        else:
            lines.append(f"{len(self.problems)} problem{'s' * (len(self.problems) != 1)}:")
            lines.extend(f"  {p.what}{self._steps_of(p.rows)}" for p in self.problems)
            lines.append(f"rows that verify: {_rows_text(0, self.verified_rows, self.steps)}")
            if self.repair is None:
                lines.append(
                    f"`wordystore verify {self.store} --repair` rebuilds the commit record from the rows "
                    "that verify (and the documents the metadata determines); it deletes nothing"
                )
        if self.repair is not None:
            r = self.repair
            if r.record is not None:
                lines.append(
                    f"repair: commit.json admits {r.record.committed_rows} rows ({r.record.compacted_rows} compacted)"
                )
            lines.extend(f"  rewrote {key}" for key in r.rewritten)
            lines.extend(f"  kept the old bytes as {key}" for key in r.backups)
            lines.extend(f"  could not save: {line}" for line in r.not_saved)
            lines.extend(f"  removed {key}, a temporary file a killed writer left" for key in r.removed)
            if not (r.rewritten or r.not_saved or r.removed):
                lines.append("  nothing to repair")
        if self.leftovers:
            lines.append(
                f"{len(self.leftovers)} temporary file{'s' * (len(self.leftovers) != 1)} a killed writer left "
                f"(such as '{self.leftovers[0]}'): `wordystore verify {self.store} --repair`, or resuming the "
                "writer, removes them"
            )
        if self.format_version is not None and self.format_version < FORMAT_VERSION:
            lines.append(
                f"format {self.format_version}: this store predates {PREDATES[self.format_version]}; "
                f"`wordystore convert {self.store} NEW.zarr` writes it as format {FORMAT_VERSION}, bit for bit"
            )
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """What ``wordystore verify --json`` prints: the outcome, each problem (rows [start, stop)), the repair."""
        record = self.record.to_json() if self.record else None
        return {
            "store": self.store,
            "ok": self.ok,
            "exit_status": self.exit_status,
            "commit_record": record,
            "verified_rows": self.verified_rows,
            "verified_steps": [int(self.steps[0]), int(self.steps[-1])] if self.verified_rows else [],
            "chunks": self.chunks,
            "problems": [
                {"where": p.where, "what": p.what, "rows": list(p.rows) if p.rows else None} for p in self.problems
            ],
            "repair": None
            if self.repair is None
            else {
                "record": self.repair.record.to_json() if self.repair.record else None,
                "rewritten": list(self.repair.rewritten),
                "backups": list(self.repair.backups),
                "not_saved": list(self.repair.not_saved),
                "removed": list(self.repair.removed),
            },
            "leftovers": list(self.leftovers),
            "note": self.note,
        }

    def _steps_of(self, rows: tuple[int, int] | None) -> str:
        steps = self.known_steps if self.known_steps is not None else self.steps
        if rows is None or rows[1] > len(steps) or np.any(steps[rows[0] : rows[1]] < 0):
            return ""
        return f" [training steps {steps[rows[0]]}..{steps[rows[1] - 1]}]"


def _rows_text(start: int, stop: int, steps: np.ndarray) -> str:
    if stop <= start:
        return "none"
    return f"rows {start}..{stop - 1}, training steps {steps[start]}..{steps[stop - 1]}"


def verify(where, *, repair: bool = False, progress: bool = False) -> VerifyReport:
    """Check the trajectory at ``where`` end to end (module docstring); with ``repair``, rebuild
    its commit record from the rows that verify. Takes the writer lock: no writer may be running.

    Parameters
    ----------
    where : str, os.PathLike or zarr store
        The trajectory to check.
    repair : bool
        Rebuild the commit record (and documents) from the longest prefix of rows that verifies,
        keeping backups of what it replaces, then check again.
    progress : bool
        Draw a progress bar.

    Returns
    -------
    VerifyReport
        ``ok`` when nothing is wrong; ``problems`` lists what is, ``verified_rows`` how many rows
        verify, ``summary()`` says it all. The outcome is recorded in the store (``verified.json``).

    Examples
    --------
    >>> import wordystore
    >>> report = wordystore.verify("runs/quick.zarr")
    >>> report.ok, report.verified_rows, [p.what for p in report.problems]
    (True, 5, [])
    """
    looking = as_store(where, read_only=True)  # refuse what is no trajectory before making or locking anything
    try:
        json_documents.read_metadata(looking)
    except (FormatError, FileNotFoundError):
        if not _looks_like_a_trajectory(looking):
            raise
    store = as_store(where, read_only=False)
    lock = writer_lock(store)
    try:
        scan = StoreScan(store, progress)
        scan.check()
        done = None
        if repair and (scan.problems or scan.leftovers):
            done = repair_store(store, scan, progress)
            scan = StoreScan(store, progress)
            scan.check()
        report = VerifyReport(
            scan.where,
            scan.record,
            scan.verified.committed_rows,
            scan.verified.steps,
            scan.chunks,
            tuple(scan.problems),
            done,
            known_steps=scan.known_steps(),
            format_version=scan.meta.format_version if scan.meta else None,
            leftovers=tuple(scan.leftovers),
        )
        try:
            json_documents.write_json(
                store,
                VERIFIED_KEY,
                {
                    "committed_rows": report.record.committed_rows if report.record else 0,
                    "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "problems": len(report.problems),
                },
            )
        except OSError as exc:  # e.g. a full disk: the check stands, unrecorded
            return dataclasses.replace(
                report, note=f"this check was not recorded in {VERIFIED_KEY}: {exc.strerror or exc}"
            )
        return report
    finally:
        lock.release()


def _looks_like_a_trajectory(store) -> bool:
    """A store whose metadata does not read is a damaged trajectory, rather than something else,
    if it has a commit record of a version this wordystore reads, or a hot tier."""
    try:
        doc = json_documents.read_json(store, COMMIT_KEY)
        hot = storage.exists(store, document_key(HOT_GROUP))
    except FileNotFoundError:  # a read-only store whose directory does not exist
        return False
    except FormatError:
        doc, hot = None, storage.exists(store, document_key(HOT_GROUP))
    version = doc.get("format_version") if isinstance(doc, dict) else None
    return version in READ_VERSIONS or hot
