"""``wordystore verify --repair``: rebuild a store's commit record from the rows that verify.

A repair never deletes or rewrites a chunk. It removes the temporary files a killed writer left,
rebuilds the documents that the metadata determines (an array's ``zarr.json``, a group's) when they
are missing or unreadable, and the fields the metadata determines in the metadata document and an
array's attributes when some are missing or extra (an array's document that disagrees with the
metadata is left alone, and so is the record: which of the two is wrong cannot be told), then
writes a commit record admitting the longest prefix of rows that verifies in every array, at most
the rows the old record admitted: the main tier's rows below the old record's ``compacted_rows``,
and past it while no hot block holds the row (a writer deletes hot copies only after committing
their compaction), then the hot tier's. Each replaced document's old bytes are kept under
``<key>.<UTC time>.bak``; what could not be saved is listed. Rows past the new record
stay on disk until a writer appends over them: copying the backup over ``commit.json`` undoes it.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from dataclasses import dataclass

import crc32c

from wordystore.check.store_scan import StoreScan
from wordystore.format.keys import COMMIT_KEY, GROUP_JSON, MAX_STATE_BYTES, document_key, is_state_key
from wordystore.format.layout import ArrayLayout
from wordystore.format.records import CommitRecord, state_entry_problem
from wordystore.store import json_documents, resume_state, storage


@dataclass(frozen=True)
class Repair:
    """What a repair did."""

    old_record: dict | None  # the commit record before (None: missing or unreadable)
    record: CommitRecord | None  # the commit record written (None: none could be)
    rewritten: tuple[str, ...]  # keys rebuilt: documents, then commit.json
    backups: tuple[str, ...]  # where the replaced documents' old bytes are kept
    not_saved: tuple[str, ...]  # what could not be saved, one line each
    removed: tuple[str, ...] = ()  # temporary files a killed writer left


def repair_store(store, found: StoreScan, progress: bool) -> Repair:
    """Rebuild the documents the metadata determines, then the commit record from the rows that
    verify; ``found`` is the pass that found the store's problems."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    rewritten, backups, not_saved = [], [], []
    record = found.record
    for key in found.leftovers:
        storage.delete(store, key)
    removed = tuple(found.leftovers)
    if found.meta is None:
        return Repair(
            found.old_record,
            record,
            (),
            (),
            ("the metadata document (zarr.json) is damaged and cannot be rebuilt: restore it from a copy",),
            removed,
        )
    lost_sets = tuple(
        f"token set '{name}' is damaged; store it again with TrajectoryWriter.add_token_set"
        for name in found.damaged_sets
    )

    def replace(key: str, document: dict) -> None:
        old = storage.get(store, key)
        if old is not None:
            backups.append(_backup(store, key, old, stamp))
        json_documents.write_json(store, key, document, durable=True)
        rewritten.append(key)

    for key in found.damaged_groups:
        replace(key, GROUP_JSON)
    if found.incomplete_metadata:
        replace(document_key(""), found.meta.to_root_json())
    for tier, name in sorted(found.incomplete):
        layout = found.layouts[tier, name]
        attributes = found.expected_layout(tier, name, 0).attributes
        replace(document_key(layout.path), dataclasses.replace(layout, attributes=attributes).to_zarr_json())
    for (tier, name), layout in found.layouts.items():
        # An array's zarr.json is rebuilt when it is unreadable, or when its shape misses rows its
        # shards hold (then the record needing them may be right); the shape covers those shards.
        expected = found.expected_layout(tier, name, 0)
        held = _rows_in_shards(store, expected)
        needed = 0 if record is None else record.tiers.span(tier)[1]
        if (tier, name) in found.unreadable or (layout is not None and layout.shape[0] < min(needed, held)):
            replace(document_key(expected.path), found.expected_layout(tier, name, held).to_zarr_json())
    disagree = [
        found.expected_layout(tier, name, 0).path
        for (tier, name), layout in found.layouts.items()
        if layout is None and (tier, name) not in found.unreadable
    ]
    if disagree:  # which of the two documents is wrong cannot be told: leave both, and the record
        return Repair(
            found.old_record,
            record,
            tuple(rewritten),
            tuple(backups),
            (
                f"the commit record was left as it is: the zarr.json of {', '.join(disagree)} disagrees with the "
                "metadata document; restore whichever is wrong from a copy, then repair again",
            )
            + lost_sets,
            removed,
        )

    salvage = StoreScan(store, progress)
    try:  # every row the arrays hold (the main tier's by its shape, the hot blocks present), up to the record's
        salvage.read_documents()
        salvage.scan(salvage.salvage_plan(math.inf, record.committed_rows if record else math.inf))
        prefix = salvage.prefix(
            record.compacted_rows if record else 0, record.committed_rows if record else math.inf, extend=True
        )
        candidates = record.states if record else _states_present(store, found.meta.format_version)
        states = tuple(s for s in candidates if salvage.state_problem(s, prefix.steps, prefix.committed_rows) is None)
    finally:
        salvage.close()
    committed = prefix.committed_rows
    not_saved += [
        f"resume state {s.get('key')!r}: {salvage.state_problem(s, prefix.steps, committed)}"
        for s in (record.states if record else ())
        if s not in states
    ]
    new = CommitRecord(
        committed,
        prefix.compacted_rows,
        int(prefix.steps[-1]) if committed else None,
        states,
        found.meta.format_version,
    )
    if new != record:
        old = storage.get(store, COMMIT_KEY)
        if old is not None:
            backups.append(_backup(store, COMMIT_KEY, old, stamp))
        json_documents.write_commit(store, new, durable=True)
        rewritten.append(COMMIT_KEY)
    held = max(layout.shape[0] for layout in salvage.layouts.values())
    held = min(held, record.committed_rows) if record else held
    if held > committed:
        cause = [p for p in salvage.problems if p.rows and p.rows[1] > committed]  # the one at the cut first
        first = min(cause, key=lambda p: p.rows[0] > committed).what if cause else None
        lost = "committed" if record else "found in the arrays (some maybe never committed, or padding)"
        not_saved.append(f"rows {committed}..{held - 1} {lost}" + (f": {first}" if first else ""))
    return Repair(found.old_record, new, tuple(rewritten), tuple(backups), tuple(not_saved) + lost_sets, removed)


def _rows_in_shards(store, layout: ArrayLayout) -> int:
    """The rows up to the end of the array's last shard present (by listing; temporary files aside)."""
    coords = [layout.shard_coords(key) for key in storage.list_prefix(store, layout.chunk_prefix)]
    return max([(c[0] + 1) * layout.shard[0] for c in coords if c] + [0])


def _backup(store, key: str, data: bytes, stamp: str) -> str:
    """Keep a document's old bytes beside it under a key no other backup has; returns the key."""
    backup, n = f"{key}.{stamp}.bak", 1
    while storage.exists(store, backup):
        backup, n = f"{key}.{stamp}-{n}.bak", n + 1
    storage.put(store, backup, data)
    storage.sync_to_disk(store, [backup])
    return backup


def _states_present(store, version: int) -> tuple[dict, ...]:
    """Resume states found by their keys (when there is no record to name them), oldest first, as
    the record of format ``version`` names them."""
    found = []
    for key in storage.list_prefix(store, resume_state.KEY_PREFIX):
        try:
            data = storage.get(store, key, limit=MAX_STATE_BYTES) if is_state_key(key) else None
            row, step = resume_state.held_by(data)
        except Exception:  # absent, unreadable or no state: state_problem() would refuse it anyway
            continue
        entry = {"row": row, "step": step, "key": key, "crc32c": crc32c.crc32c(data), "nbytes": len(data)}
        entry = entry if version >= 3 else {k: entry[k] for k in ("row", "step", "key")}
        if state_entry_problem(entry, version) is None:
            found.append(entry)
    return tuple(sorted(found, key=lambda s: s["row"]))
